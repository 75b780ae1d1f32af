"""The firehose tier (``trio-run proxy.firehose``): the ONE connection to Polygon.

It subscribes at Polygon the union of ``FIREHOSE_SUBSCRIPTIONS`` and what its
downstreams ask for, relays every data frame verbatim to downstreams holding
``*`` and filters for the others. Alone, it is a complete single-tier proxy.
"""

from __future__ import annotations

import logging

from .app.config import load_firehose_config, setup_logging
from .app.tier import log_start_up, run_tier

log = logging.getLogger("proxy.firehose")


async def main() -> None:
    """``trio-run proxy.firehose``: the firehose configured from the environment and ``.env``."""
    config = load_firehose_config()
    setup_logging(config.log_level, config.library_log_level)
    log_start_up(log, config, "Polygon Firehose Proxy", "POLYGON_URL")
    if config.static_channels:
        log.info("Always subscribed: %s", ",".join(c.text for c in config.static_channels))
    await run_tier(config)


if __name__ == "__main__":
    from .app.cli import run_module_main
    raise SystemExit(run_module_main(main))
