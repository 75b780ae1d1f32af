"""The filtered proxy tier (``trio-run proxy.filtered``): where users connect.

It takes everything (``*``) from the firehose, forwards its clients' combined
demand so the firehose subscribes exactly that at Polygon, and gives each
client exactly the events it subscribed to, as the original bytes.
"""

from __future__ import annotations

import logging

from .app.config import load_filtered_config, setup_logging
from .app.tier import log_start_up, run_tier
from .app.workers import run_workers

log = logging.getLogger("proxy.filtered")


async def main() -> None:
    """``trio-run proxy.filtered``: the filtered proxy (or its workers' parent) configured from the environment."""
    config = load_filtered_config()
    setup_logging(config.log_level, config.library_log_level)
    log_start_up(log, config, "Polygon Filtered WebSocket Proxy", "FIREHOSE_URL")
    if config.allow_any_key:
        log.warning(
            "!!! NO CLIENT AUTHENTICATION: FILTERED_PROXY_API_KEYS and POLYGON_API_KEY are both "
            "empty, so ANY key is accepted. Set FILTERED_PROXY_API_KEYS before exposing this port. !!!"
        )
    if config.workers > 1:
        await run_workers(config)  # N processes on the port, one metrics endpoint for all
    else:
        await run_tier(config)


if __name__ == "__main__":
    from .app.cli import run_module_main
    raise SystemExit(run_module_main(main))
