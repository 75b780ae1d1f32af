"""Two network namespaces joined by a veth pair, for tests that put a real, impaired network between tiers.

:func:`link_between_namespaces` creates the namespaces ``…u`` (the upstream side) and ``…d``
(the downstream side), joined by a veth pair (``UP_ADDRESS`` ↔ ``DOWN_ADDRESS``), and removes
them afterwards whatever happened (processes still inside are the caller's to stop first; a
namespace whose test process died is removed by the next run). :class:`Link` impairs the link:
a blackout (the upstream end set down: packets vanish, no TCP connection is reset, a new
connection's SYN goes unanswered), a token-bucket rate limit (``tbf``: real queueing delay) and
``netem`` delay or loss where the kernel has ``sch_netem``. :func:`socket_in` makes a socket in
a namespace from this process (a socket stays in the namespace it was made in), so test clients
run here while the tiers run inside.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import socket
import subprocess
from typing import Iterator

import attrs

__all__ = ["DOWN_ADDRESS", "UP_ADDRESS", "Link", "link_between_namespaces", "netem_missing", "socket_in", "unavailable"]

UP_ADDRESS = "10.77.0.1"
DOWN_ADDRESS = "10.77.0.2"
_PREFIX = "ptx"  # every namespace and veth this module makes starts with it
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_numbers = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _tc(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", "-n", namespace, *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2), or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} missing: apt-get install iproute2 (.ci/run installs it)"
    return None


def _remove_stale() -> None:
    """Namespaces of ours left by a test process that died (killed, out of time) before removing them."""
    listed = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({_PREFIX}(\d+)x\d+[ud])\b", listed, flags=re.MULTILINE):
        full, pid = name
        if not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", full, check=False)


@attrs.frozen
class Link:
    """The veth pair between the two namespaces: ``up`` holds ``up_device`` (``UP_ADDRESS``),
    ``down`` holds ``down_device`` (``DOWN_ADDRESS``)."""

    up: str
    down: str
    up_device: str
    down_device: str

    def blackout(self) -> None:
        """Drop every packet both ways, silently: the upstream end goes down, so what the
        downstream side sends meets a peer without carrier (dropped, no error), and what the
        upstream side sends finds no route (the kernel retries). No RST is sent, no TCP
        connection is reset; :meth:`restore` brings the same connections back."""
        _ip("-n", self.up, "link", "set", self.up_device, "down")

    def restore(self) -> None:
        _ip("-n", self.up, "link", "set", self.up_device, "up")

    def shape(self, *, rate: str, burst: str, latency: str) -> None:
        """A token bucket on the upstream end (the data's direction): ``rate`` on average,
        ``burst`` at line rate, then a queue of up to ``latency``; beyond it, drops."""
        _tc(self.up, "qdisc", "replace", "dev", self.up_device, "root", "tbf",
            "rate", rate, "burst", burst, "latency", latency)

    def netem(self, *args: str) -> None:
        """``tc netem`` with ``args`` (``delay 50ms``, ``loss 2%``) on both ends: both directions."""
        for namespace, device in ((self.up, self.up_device), (self.down, self.down_device)):
            _tc(namespace, "qdisc", "replace", "dev", device, "root", "netem", *args)

    def qdisc_stats(self) -> str:
        """``tc -s qdisc`` of the upstream end: what the impairment did (sent, dropped, overlimits)."""
        return _tc(self.up, "-s", "qdisc", "show", "dev", self.up_device).stdout


def netem_missing(link: Link) -> str | None:
    """Why ``netem`` cannot be used on ``link`` (the kernel's words), or None when it can."""
    tried = _tc(link.up, "qdisc", "add", "dev", link.up_device, "root", "netem", "delay", "1ms", check=False)
    if tried.returncode != 0:
        return f"kernel has no sch_netem (tc: {tried.stderr.strip()})"
    _tc(link.up, "qdisc", "del", "dev", link.up_device, "root")
    return None


@contextlib.contextmanager
def link_between_namespaces() -> Iterator[Link]:
    """Two fresh namespaces joined by a veth pair, loopback up in each; removed on the way out."""
    _remove_stale()
    tag = f"{_PREFIX}{os.getpid()}x{next(_numbers)}"
    link = Link(up=f"{tag}u", down=f"{tag}d", up_device="vethup", down_device="vethdown")
    created: list[str] = []
    try:
        for namespace in (link.up, link.down):
            _ip("netns", "add", namespace)
            created.append(namespace)
        # Each end is born in its namespace: nothing appears in the namespace this process runs in.
        _ip("link", "add", link.up_device, "netns", link.up, "type", "veth",
            "peer", "name", link.down_device, "netns", link.down)
        for namespace, device, address in ((link.up, link.up_device, UP_ADDRESS),
                                           (link.down, link.down_device, DOWN_ADDRESS)):
            _ip("-n", namespace, "addr", "add", f"{address}/30", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield link
    finally:
        # A namespace's removal takes its end of the veth with it, and the pair with that end.
        for namespace in created:
            _ip("netns", "del", namespace, check=False)


def socket_in(namespace: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket of ``namespace``, made by this thread stepping into it and straight back."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}: {os.strerror(ctypes.get_errno())}")
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            if _libc.setns(here, _CLONE_NEWNET) != 0:  # never go on in the wrong namespace
                os.abort()
    finally:
        os.close(here)
        os.close(there)
