"""``python -m proxy.keys hash``: the SHA-256 line to put in an ``API_KEYS_FILE`` for a key.

The key is read from standard input (typed at a hidden prompt when that is a
terminal), never from the command line, where it would stay in the shell's history
and in the process list.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from ..core.entitlements import hash_key

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Print ``sha256 = "..."`` for the key given on standard input; the exit code."""
    parser = argparse.ArgumentParser(prog="python -m proxy.keys", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    hashing = commands.add_parser("hash", help="print the sha256 line for a key read from standard input")
    hashing.add_argument("--name", default=None, help="also print the [keys.NAME] line above it")
    args = parser.parse_args(argv)
    if sys.stdin.isatty():
        key = getpass.getpass("API key (not echoed): ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("error: no key given on standard input", file=sys.stderr)
        return 2
    if args.name:
        print(f"[keys.{args.name}]")
    print(f'sha256 = "{hash_key(key)}"')
    return 0
