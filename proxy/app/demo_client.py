"""The demo's sample client: subscribes like README's example and prints its filtered stream.

``python -m proxy.app.demo_client [--url URL] [--key KEY] [--channels T.AAPL] [--seconds N]``
prints every event it receives on one line, and once a second a summary: events
the filtered proxy took in from the firehose (read from its /metrics when
available) and events this client received.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.request
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

__all__ = ["proxy_events_in", "print_events", "run", "main"]


def proxy_events_in(metrics_url: str | None, market: str = "stocks") -> str:
    """The filtered proxy's events received so far for ``market``, read from its /metrics, or "n/a"."""
    if not metrics_url:
        return "n/a"
    try:
        with urllib.request.urlopen(metrics_url, timeout=0.5) as response:
            for line in response.read().decode().splitlines():
                # e.g. proxy_upstream_events_total{market="stocks",tier="filtered"} 1234.0
                if line.startswith("proxy_upstream_events_total{") and f'market="{market}"' in line:
                    return str(int(float(line.rsplit(" ", 1)[1])))
    except OSError:
        pass
    return "n/a"


def print_events(message: str | bytes, label: str) -> int:
    """Print each event of a Polygon message on a line of its own (statuses too, so that every
    line of the stream looks alike); returns how many were data events."""
    data = 0
    for event in json.loads(message):
        print(label + json.dumps(event, separators=(",", ":")), flush=True)
        data += event.get("ev") != "status"
    return data


async def run(args: argparse.Namespace) -> int:
    """Connect, authenticate, subscribe and print the stream; the exit code."""
    try:
        async with open_websocket_url(args.url) as ws:
            label = f"[{args.label}] " if args.label else ""
            market = urlsplit(args.url).path.strip("/") or "stocks"
            print_events(await ws.get_message(), label)
            await ws.send_message(json.dumps({"action": "auth", "params": args.key}))
            print_events(await ws.get_message(), label)
            await ws.send_message(json.dumps({"action": "subscribe", "params": args.channels}))
            received = total = 0
            with trio.move_on_after(args.seconds if args.seconds > 0 else float("inf")):
                next_summary = trio.current_time() + 1
                while True:
                    with trio.move_on_at(next_summary):
                        received += print_events(await ws.get_message(), label)
                        continue
                    total += received
                    in_count = await trio.to_thread.run_sync(proxy_events_in, args.metrics_url, market)
                    print(f"{label}-- last second: {received} events out to this client ({args.channels}); "
                          f"total out {total}; proxy events in so far: {in_count}", flush=True)
                    received = 0
                    next_summary += 1
    except (OSError, HandshakeError, ConnectionClosed) as error:
        print(f"demo client: cannot talk to {args.url}: {error}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """Parse the command line and run the client until Ctrl-C or ``--seconds``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/stocks")
    parser.add_argument("--key", default="demo-key")
    parser.add_argument("--channels", default="T.AAPL")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = never)")
    parser.add_argument("--metrics-url", default=None)
    parser.add_argument("--label", default="", help="a prefix for every line (another market's client)")
    args = parser.parse_args()
    # scripts/demo runs this client in the background, and bash starts background commands with
    # SIGINT ignored: take Ctrl-C back so that it stops this client at once and quietly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(trio.run(run, args))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
