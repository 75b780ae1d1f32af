"""Shared helpers: start the simulator and tiers on 127.0.0.1 port 0, and a test client."""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from proxy.core.backoff import Backoff
from proxy.core.settings import FRAME_TICK, SimulatorConfig, TierConfig
from proxy.core.protocol import EVERYTHING_CHANNEL
from proxy.sim.simulator import Simulator, run_simulator
from proxy.app.tier import Tier, run_tier

POLYGON_KEY = "sim-key"
FIREHOSE_KEY = "firehose-key"
CLIENT_KEY = "client-key"
FAST_BACKOFF = Backoff(initial_seconds=0.05, max_seconds=0.2, healthy_after_seconds=5, refused_seconds=0.3)


def simulator_config(**overrides: Any) -> SimulatorConfig:
    # Tests run the simulator, the tiers and their clients in one process: at their rates
    # (up to 20,000 events/s) one-event frames would measure that process, not the behaviour
    # under test, so they keep the framing of one 10 ms tick per frame unless they say otherwise.
    defaults: dict[str, Any] = dict(
        host="127.0.0.1", port=0, api_keys=frozenset({POLYGON_KEY}), symbols=40,
        events_per_second=2000, seed=7, max_connections=1, frame_events=FRAME_TICK,
    )
    return SimulatorConfig(**{**defaults, **overrides})


def firehose_config(simulator: Simulator, **overrides: Any) -> TierConfig:
    defaults: dict[str, Any] = dict(
        tier="firehose", upstream_url=f"ws://127.0.0.1:{simulator.port}/stocks",
        upstream_api_key=POLYGON_KEY, upstream_extra=(), static_channels=(), host="127.0.0.1",
        port=0, api_keys=frozenset({FIREHOSE_KEY}), allow_any_key=False, metrics_port=None,
        unsubscribe_grace_seconds=0.3, backoff=FAST_BACKOFF,
        keepalive_interval_seconds=0.5, keepalive_timeout_seconds=1.0, shutdown_close_seconds=0.05,
    )
    return TierConfig(**{**defaults, **overrides})


def filtered_config(firehose: Tier | int, **overrides: Any) -> TierConfig:
    port = firehose if isinstance(firehose, int) else firehose.port
    defaults: dict[str, Any] = dict(
        tier="filtered", upstream_url=f"ws://127.0.0.1:{port}", upstream_api_key=FIREHOSE_KEY,
        upstream_extra=(EVERYTHING_CHANNEL,), static_channels=(), host="127.0.0.1", port=0,
        api_keys=frozenset({CLIENT_KEY}), allow_any_key=False, metrics_port=None,
        unsubscribe_grace_seconds=0.3, backoff=FAST_BACKOFF,
        keepalive_interval_seconds=0.5, keepalive_timeout_seconds=1.0, shutdown_close_seconds=0.05,
    )
    return TierConfig(**{**defaults, **overrides})


async def start_simulator(nursery: trio.Nursery, **overrides: Any) -> Simulator:
    return await nursery.start(run_simulator, simulator_config(**overrides))


async def start_tier(nursery: trio.Nursery, config: TierConfig) -> Tier:
    tier = await nursery.start(run_tier, config)
    return tier


async def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@attrs.define
class Client:
    """A Polygon client as a user would write one, over trio-websocket, for tests."""

    ws: WebSocketConnection
    statuses: list[dict] = attrs.field(factory=list)
    events: list[dict] = attrs.field(factory=list)
    frames: list[str] = attrs.field(factory=list)

    async def receive(self) -> list[dict]:
        message = await self.ws.get_message()
        self.frames.append(message)
        parsed = json.loads(message)
        for event in parsed:
            (self.statuses if event.get("ev") == "status" else self.events).append(event)
        return parsed

    async def send(self, action: str, params: Any) -> None:
        await self.ws.send_message(json.dumps({"action": action, "params": params}))

    async def request(self, action: str, params: Any) -> list[dict]:
        """Send an action and return the next frame (its answer while no data flows)."""
        await self.send(action, params)
        return await self.next_status()

    async def next_status(self, timeout: float = 5.0) -> list[dict]:
        with trio.fail_after(timeout):
            while True:
                frame = await self.receive()
                found = [event for event in frame if event.get("ev") == "status"]
                if found:
                    return found

    async def auth(self, key: str) -> list[dict]:
        return await self.request("auth", key)

    async def collect(self, seconds: float) -> list[dict]:
        """Read everything for ``seconds``; returns the data events received in that time."""
        start = len(self.events)
        with trio.move_on_after(seconds):
            try:
                while True:
                    await self.receive()
            except ConnectionClosed:
                pass
        return self.events[start:]

    async def wait_events(self, count: int, timeout: float = 5.0) -> list[dict]:
        with trio.fail_after(timeout):
            while len(self.events) < count:
                await self.receive()
        return self.events

    async def close_code(self, timeout: float = 5.0) -> int:
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.receive()
            except ConnectionClosed as closed:
                return closed.reason.code


async def connect(nursery: trio.Nursery, port: int, path: str = "/stocks") -> Client:
    ws = await connect_websocket_url(nursery, f"ws://127.0.0.1:{port}{path}")
    client = Client(ws)
    greeting = await client.receive()
    assert greeting == [{"ev": "status", "status": "connected", "message": "Connected Successfully"}]
    return client


async def authed_client(nursery: trio.Nursery, port: int, key: str, subscribe: str | None = None) -> Client:
    client = await connect(nursery, port)
    assert (await client.auth(key))[0]["status"] == "auth_success"
    if subscribe:
        await client.send("subscribe", subscribe)
        while True:  # relayed upstream_* statuses may arrive first; the answer is what we want
            answer = [s for s in await client.next_status() if not s["status"].startswith("upstream_")]
            if answer:
                break
        assert all(status["status"] == "success" for status in answer), answer
    return client


def selects(params: str, event: dict) -> bool:
    """A reference filter, written from docs/protocol.md's rules, independent of the proxy's code."""
    ev = event.get("ev")
    symbol = event.get({"LULD": "T", "NOI": "T", "V": "T"}.get(ev, "sym"))
    for channel in (item.strip() for item in params.split(",")):
        if channel == "*":
            return True
        ev_type, _, wanted = channel.partition(".")
        if ev_type == ev and isinstance(symbol, str) and wanted in ("*", symbol):
            return True
    return False
