"""The firehose tier (``trio-run proxy.firehose``): the ONE connection to Polygon.

It subscribes at Polygon the union of ``FIREHOSE_SUBSCRIPTIONS`` and what its
downstreams ask for, relays every data frame verbatim to downstreams holding
``*`` and filters for the others. Alone, it is a complete single-tier proxy.
"""

from __future__ import annotations

import logging

from .app.config import check_market_url, load_firehose_config, setup_logging
from .app.tier import run_tier

log = logging.getLogger("proxy.firehose")


async def main() -> None:
    config = load_firehose_config()
    setup_logging(config.log_level, config.library_log_level)
    log.info("Starting Polygon Firehose Proxy")
    log.info("Polygon URL: %s", config.upstream_url)
    log.info("Market: %s (clients connect at / and /%s)", config.market, config.market)
    mismatch = check_market_url(config.market, config.upstream_url, "POLYGON_URL")
    if mismatch:
        log.warning("%s", mismatch)
    log.info("Listening port: %d", config.port)
    if config.static_channels:
        log.info("Always subscribed: %s", ",".join(c.text for c in config.static_channels))
    await run_tier(config)


if __name__ == "__main__":
    from .app.cli import run_module_main
    raise SystemExit(run_module_main(main))
