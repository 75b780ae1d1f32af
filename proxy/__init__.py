"""A two-tier Polygon (Massive) WebSocket proxy on Trio.

``proxy.firehose`` holds the one upstream connection to Polygon and fans data out;
``proxy.filtered`` takes everything from the firehose and gives each client exactly
the events it subscribed to; ``proxy.simulator`` is a Polygon-compatible server with
synthetic data. Each module exposes ``async def main()``, run with ``trio-run``.
"""

__version__ = "0.1.0"
