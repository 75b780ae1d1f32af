"""The filtered proxy tier (``trio-run proxy.filtered``): where users connect.

It takes everything (``*``) from the firehose, forwards its clients' combined
demand so the firehose subscribes exactly that at Polygon, and gives each
client exactly the events it subscribed to, as the original bytes.
"""

from __future__ import annotations

import logging

from .app.config import check_market_url, load_filtered_config, setup_logging
from .app.tier import run_tier

log = logging.getLogger("proxy.filtered")


async def main() -> None:
    config = load_filtered_config()
    setup_logging(config.log_level, config.library_log_level)
    log.info("Starting Polygon Filtered WebSocket Proxy")
    log.info("Firehose URL: %s", config.upstream_url)
    log.info("Market: %s (clients connect at / and /%s)", config.market, config.market)
    mismatch = check_market_url(config.market, config.upstream_url, "FIREHOSE_URL")
    if mismatch:
        log.warning("%s", mismatch)
    log.info("Listening port: %d", config.port)
    if config.allow_any_key:
        log.warning(
            "!!! NO CLIENT AUTHENTICATION: FILTERED_PROXY_API_KEYS and POLYGON_API_KEY are both "
            "empty, so ANY key is accepted. Set FILTERED_PROXY_API_KEYS before exposing this port. !!!"
        )
    await run_tier(config)


if __name__ == "__main__":
    from .app.cli import run_module_main
    raise SystemExit(run_module_main(main))
