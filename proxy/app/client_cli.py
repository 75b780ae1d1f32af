"""``python -m proxy.client``: subscribe to channels and print the stream, for checking a feed by hand.

``python -m proxy.client [--url URL] [--key KEY] [--json] [--count N] CHANNEL...``
connects to a tier (or Polygon itself), authenticates, subscribes and prints one
event per line in a readable form (``--json``: the events as JSON lines, byte for
byte as received), statuses on standard error. It stops after ``--count`` data
events, at Ctrl-C, or when the server closes; the exit code says which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Callable, TextIO

import msgspec
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

__all__ = ["format_event", "main", "run"]

#: The events a frame holds, each as the exact bytes the server sent (no re-encoding).
_split_frame = msgspec.json.Decoder(list[msgspec.Raw]).decode
_FIELDS_OF: dict[str, Callable[[dict[str, Any]], str]] = {
    "T": lambda e: f"{e.get('p')} x {e.get('s')}",
    "Q": lambda e: f"bid {e.get('bp')} x {e.get('bs')}  ask {e.get('ap')} x {e.get('as')}",
    "A": lambda e: f"o {e.get('o')} h {e.get('h')} l {e.get('l')} c {e.get('c')} v {e.get('v')}",
    "AM": lambda e: f"o {e.get('o')} h {e.get('h')} l {e.get('l')} c {e.get('c')} v {e.get('v')}",
    "LULD": lambda e: f"limit up {e.get('h')} down {e.get('l')}",
    "FMV": lambda e: f"fair value {e.get('fmv')}",
}


def format_event(event: dict[str, Any]) -> str:
    """One event as a line for a person: time, type, symbol, then the fields that matter."""
    ev = str(event.get("ev", "?"))
    symbol = event.get("sym") or event.get("pair") or event.get("T") or event.get("p") or ""
    stamp = event.get("t") or event.get("s") if ev in ("A", "AM") else event.get("t")
    when = ""
    if isinstance(stamp, (int, float)) and stamp > 0:
        when = datetime.datetime.fromtimestamp(stamp / 1000, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    fields = _FIELDS_OF.get(ev)
    rest = fields(event) if fields else json.dumps({k: v for k, v in event.items() if k not in ("ev",)},
                                                   separators=(",", ":"))
    return f"{when:>12}  {ev:<4} {str(symbol):<10} {rest}".rstrip()


async def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Talk to the server as ``args`` say; the exit code (0: done, 1: failed or refused)."""
    received = 0
    try:
        async with open_websocket_url(args.url) as ws:
            subscribe: dict[str, Any] = {"action": "subscribe", "params": ",".join(args.channels)}
            if args.from_ms is not None:
                subscribe["from"] = args.from_ms
            await ws.send_message(json.dumps({"action": "auth", "params": args.key}))
            subscribed = False
            while args.count is None or received < args.count:
                for raw in _split_frame(await ws.get_message()):
                    event = msgspec.json.decode(raw)
                    if isinstance(event, dict) and event.get("ev") == "status":
                        status = event.get("status")
                        print(f"status {status}: {event.get('message')}", file=err, flush=True)
                        if status in ("auth_failed", "auth_timeout", "max_connections"):
                            return 1
                        if status == "error" and "nothing of this subscribe was applied" in str(event.get("message")):
                            return 1  # the whole subscribe was refused: nothing will come
                        if status == "auth_success" and not subscribed:
                            await ws.send_message(json.dumps(subscribe))
                            subscribed = True
                        continue
                    received += 1
                    print(bytes(raw).decode() if args.json else format_event(event), file=out, flush=True)
                    if args.count is not None and received >= args.count:
                        break
    except ConnectionClosed as closed:
        print(f"client: the server closed the connection ({closed.reason})", file=err)
        return 1
    except (OSError, HandshakeError) as error:
        print(f"client: cannot talk to {args.url}: {error}", file=err)
        return 1
    return 0


def _from(raw: str) -> int:
    """``--from``: milliseconds since the epoch, a negative number of milliseconds before now,
    or an ISO 8601 time."""
    try:
        return int(raw)
    except ValueError:
        moment = datetime.datetime.fromisoformat(raw)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return int(moment.timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run until ``--count`` events, the server's close or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m proxy.client", description=__doc__.splitlines()[0])
    parser.add_argument("channels", nargs="+", metavar="CHANNEL", help="T.AAPL, Q.*, ... (Polygon's channels)")
    parser.add_argument("--url", default=os.environ.get("PROXY_URL", "ws://127.0.0.1:8765/stocks"),
                        help="the tier to talk to (default: $PROXY_URL or ws://127.0.0.1:8765/stocks)")
    parser.add_argument("--key", default=os.environ.get("PROXY_KEY", ""),
                        help="the key to present (default: $PROXY_KEY; a flag is visible to other users)")
    parser.add_argument("--json", action="store_true", help="print events as JSON lines, as received")
    parser.add_argument("--count", type=int, default=None, help="stop after this many data events")
    parser.add_argument("--from", dest="from_ms", type=_from, default=None,
                        help="replay from this time where the tier keeps a journal "
                             "(ms since the epoch, negative ms before now, or ISO 8601)")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    try:
        return trio.run(run, args)
    except KeyboardInterrupt:
        return 130
