"""CPU per channel subscribed, and the memory it holds: SessionState → SubscriptionRegistry → reply.

``python -m bench.subscribe_cost [--clients C] [--channels N] [--overlap] [--rounds R]``:
C sessions each send one ``subscribe`` of N channels (distinct per client unless ``--overlap``),
exactly as a tier's reader handles it: :meth:`SessionState.receive` (parse, limits, the
``subscribed to`` reply frame) and the registry's subscribe. Then every client leaves
(:meth:`SubscriptionRegistry.remove_subscriber`) and the grace expires. Printed: µs per channel
for subscribing and for leaving (process CPU time, best of R rounds), and tracemalloc's view of
the memory held with everyone subscribed and after everyone left (one extra round, traced, so
that tracing does not slow the timed rounds). ``--rss`` instead runs one untimed round and
prints the process's resident memory (VmRSS) before, at the peak, after everyone left, and
after glibc's malloc_trim (which a tier calls after letting 100,000 channels go): what the
allocator gives back to the system, which tracemalloc does not show.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
import tracemalloc

from proxy.core.session import SessionState
from proxy.core.subscriptions import SubscriptionRegistry


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _drain(registry: SubscriptionRegistry) -> None:
    """Take the upstream changes, as a tier's upstream link does (older registries kept none)."""
    take = getattr(registry, "take_upstream_changes", None)
    if take is not None:
        take()


def _subscribe_everyone(messages: list[str], channels: int) -> tuple["_Clock", SubscriptionRegistry, list[SessionState]]:
    """A registry in which client N subscribed ``messages[N]`` through its own session, upstream drained."""
    clock = _Clock()
    registry: SubscriptionRegistry = SubscriptionRegistry(clock=clock, grace_seconds=5.0)
    states = []
    for client, message in enumerate(messages):
        state = SessionState(accepted_keys=frozenset({"k"}), max_channels_per_client=channels,
                             max_channels_per_message=channels)
        state.receive('{"action":"auth","params":"k"}')
        registry.subscribe(client, state.receive(message).subscribe)
        _drain(registry)
        states.append(state)
    return clock, registry, states


def _messages(clients: int, channels: int, overlap: bool) -> list[str]:
    messages = []
    for client in range(clients):
        prefix = "S" if overlap else f"C{client}X"
        params = ",".join(f"T.{prefix}{index}" for index in range(channels))
        messages.append(json.dumps({"action": "subscribe", "params": params}))
    return messages


def _one_round(messages: list[str], channels: int) -> tuple[float, float, SubscriptionRegistry]:
    clock = _Clock()
    registry = SubscriptionRegistry(clock=clock, grace_seconds=5.0)
    states = []
    for _ in messages:
        state = SessionState(accepted_keys=frozenset({"k"}), max_channels_per_client=channels,
                             max_channels_per_message=channels)
        state.receive('{"action":"auth","params":"k"}')
        states.append(state)
    gc.collect()
    start = time.process_time()
    for client, (state, message) in enumerate(zip(states, messages)):
        reaction = state.receive(message)
        assert reaction.subscribe, reaction.replies[0][:200]
        registry.subscribe(client, reaction.subscribe)
        _drain(registry)  # as the upstream link does
    subscribed = time.process_time() - start
    start = time.process_time()
    for client in range(len(states)):
        registry.remove_subscriber(client)
    clock.now += 10.0
    registry.expire()
    _drain(registry)
    left = time.process_time() - start
    return subscribed, left, registry


def _traced_round(messages: list[str], channels: int) -> tuple[int, int, int]:
    """Bytes traced: before, with everyone subscribed (the replies dropped as a writer would), after."""
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    clock, registry, states = _subscribe_everyone(messages, channels)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    for client in range(len(states)):
        registry.remove_subscriber(client)
    clock.now += 10.0
    registry.expire()
    _drain(registry)
    del states
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del registry
    return baseline, held, after


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_round(messages: list[str], channels: int) -> tuple[float, float, float, float]:
    gc.collect()
    before = _rss_mb()
    clock, registry, states = _subscribe_everyone(messages, channels)
    peak = _rss_mb()
    for client in range(len(states)):
        registry.remove_subscriber(client)
    clock.now += 10.0
    registry.expire()
    _drain(registry)
    del states
    gc.collect()
    after = _rss_mb()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # as a tier does after expiring 100,000 channels
    except (AttributeError, OSError):
        pass
    return before, peak, after, _rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--channels", type=int, default=10_000)
    parser.add_argument("--overlap", action="store_true", help="every client subscribes the same channels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="resident memory instead of CPU and tracemalloc")
    args = parser.parse_args()
    messages = _messages(args.clients, args.channels, args.overlap)
    if args.rss:
        before, peak, after, trimmed = _rss_round(messages, args.channels)
        print(f"{args.clients} clients x {args.channels} channels: RSS {before:.0f} MB before, "
              f"{peak:.0f} MB with everyone subscribed, {after:.0f} MB after everyone left, "
              f"{trimmed:.0f} MB after malloc_trim")
        return
    total = args.clients * args.channels
    best_subscribe = best_leave = float("inf")
    for _ in range(args.rounds):
        subscribed, left, registry = _one_round(messages, args.channels)
        del registry
        best_subscribe, best_leave = min(best_subscribe, subscribed), min(best_leave, left)
    baseline, held, after = _traced_round(messages, args.channels)
    print(f"{args.clients} clients x {args.channels} channels ({'the same' if args.overlap else 'distinct'}), "
          f"best of {args.rounds}:")
    print(f"  subscribe (parse, limits, reply frame, registry): {best_subscribe / total * 1e6:.2f} us/channel")
    print(f"  leave (registry remove and grace expiry):         {best_leave / total * 1e6:.2f} us/channel")
    print(f"  traced memory: {(held - baseline) / 1e6:.1f} MB held subscribed "
          f"({(held - baseline) / total:.0f} B/channel), {(after - baseline) / 1e6:.2f} MB after all left")


if __name__ == "__main__":
    main()
