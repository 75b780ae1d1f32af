"""Every bad input answered, every fault survived, nobody let in (issue: reliability and security)."""

from __future__ import annotations

import gc
import json
import logging
import socket
import weakref

import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto.events import CloseConnection, TextMessage

from proxy.core.protocol import parse_channel_list
from tests.helpers import (
    ALL_STREAM,
    CLIENT_KEY,
    FAST_KEEPALIVE,
    FIREHOSE_KEY,
    LIVENESS_SECONDS,
    POLYGON_KEY,
    Client,
    Neighbour,
    authed_client,
    connect,
    count_tasks,
    filtered_config,
    firehose_config,
    handshake,
    masked,
    send_all,
    start_chain,
    start_simulator,
    start_tier,
    wait_connected,
    wait_until,
)


async def chain(nursery, **filtered_overrides):
    """The chain with every stream type held (for a `*` Neighbour) and the filtered proxy's overrides."""
    return await start_chain(nursery, simulator=dict(events_per_second=1000), firehose=dict(static_channels=ALL_STREAM),
                             filtered=filtered_overrides)


# (name, authenticate first?, what to send, expected status, expected close code or None)
BAD_INPUTS = [
    ("not json", True, "hello", "error", None),
    ("json, not an object", True, "[1,2,3]", "error", None),
    ("unknown action", True, '{"action":"launch","params":"x"}', "error", None),
    ("missing params", True, '{"action":"subscribe"}', "error", None),
    ("params not a string", True, '{"action":"subscribe","params":["T.AAPL"]}', "error", None),
    ("empty params", True, '{"action":"subscribe","params":""}', "error", None),
    ("10,000 channels, over the per-client limit", True,
     json.dumps({"action": "subscribe", "params": ",".join(f"T.S{i}" for i in range(10_000))}), "error", None),
    ("10,001 channels in one message", True,
     json.dumps({"action": "subscribe", "params": ",".join(f"T.S{i}" for i in range(10_001))}), "error", None),
    ("bad characters in a channel", True, '{"action":"subscribe","params":"T.AA PL;"}', "error", None),
    ("a 1,000-character channel", True,
     json.dumps({"action": "subscribe", "params": "T." + "A" * 998}), "error", None),
    ("binary frame, not UTF-8", True, b'\xff{"action":"subscribe","params":"T.AAPL"}', "error", None),
    ("deeply nested json", True, "[" * 100_000 + "]" * 100_000, "error", None),
    ("deeply nested json, small", True, '{"action":' + "[" * 3000 + "]" * 3000 + "}", "error", None),
    ("frame over MAX_MESSAGE_BYTES", True, json.dumps({"action": "auth", "params": "k" * 300_000}), None, 1009),
    ("subscribe before auth", False, '{"action":"subscribe","params":"T.AAPL"}', "error", None),
    ("unsubscribe before auth", False, '{"action":"unsubscribe","params":"T.AAPL"}', "error", None),
    ("auth twice", True, json.dumps({"action": "auth", "params": CLIENT_KEY}), "error", None),
    ("wrong key", False, '{"action":"auth","params":"wrong"}', "auth_failed", 1008),
]


async def test_every_bad_input_is_answered_and_the_neighbour_notices_nothing(nursery):
    _, _, filtered = await chain(nursery, max_channels_per_client=5_000)
    neighbour = Neighbour(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*"))
    nursery.start_soon(neighbour.run)
    for name, authenticate, message, status, close_code in BAD_INPUTS:
        if authenticate:
            client = await authed_client(nursery, filtered.port, CLIENT_KEY)
        else:
            client = await connect(nursery, filtered.port)
        await client.ws.send_message(message)
        if status is not None:
            answer = await client.next_status()
            assert answer[0]["status"] == status, (name, answer)
            assert answer[0]["message"], name
        if close_code is not None:
            assert await client.close_code() == close_code, name
        else:  # the connection survives and still works
            if not authenticate:
                assert (await client.auth(CLIENT_KEY))[0]["status"] == "auth_success", name
            answer = await client.request("subscribe", "T.AAPL")
            assert answer[0]["message"] == "subscribed to: T.AAPL", name
            await client.ws.aclose()
    await neighbour.wait_for_more()  # what was in flight meanwhile has arrived
    neighbour.assert_no_gap()
    await wait_until(lambda: len(filtered.hub.sessions) == 1, what="only the neighbour left")


async def test_no_auth_in_time_and_a_control_flood(nursery):
    _, _, filtered = await chain(nursery, auth_timeout_seconds=0.3, control_messages_per_second=20)
    neighbour = Neighbour(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*"))
    nursery.start_soon(neighbour.run)
    silent = await connect(nursery, filtered.port)
    assert (await silent.next_status())[0]["status"] == "auth_timeout"
    assert await silent.close_code() == 1008

    # The flood goes out in one write: sent message by message, the proxy's 1008 (after about 140) could
    # come while the client still sends, and the rest would then meet a closed socket and reset the
    # connection, status, close frame and all, before the client read them.
    sock, ws = await handshake(filtered.port)
    await send_all(sock, masked(json.dumps({"action": "auth", "params": CLIENT_KEY}))
                   + masked('{"action":"subscribe","params":"T.AAPL"}') * 300)
    messages, close_code = [], None
    with trio.fail_after(LIVENESS_SECONDS):
        while close_code is None:
            ws.receive_data(await sock.recv(65536) or None)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    messages += [s["message"] for s in json.loads(event.data) if s.get("ev") == "status"]
                elif isinstance(event, CloseConnection):
                    close_code = event.code
    assert close_code == 1008
    assert any(m.startswith("rate limited") for m in messages)
    assert any("flood" in m for m in messages), messages[-5:]
    assert filtered.stats.control_rate_limited > 0
    await neighbour.wait_for_more()
    neighbour.assert_no_gap()


async def test_limits_are_refused_with_a_clear_status(nursery):
    _, _, filtered = await chain(nursery, max_clients=3, max_connections_per_ip=10)
    keep = [await authed_client(nursery, filtered.port, CLIENT_KEY) for _ in range(3)]
    refused = await connect(nursery, filtered.port)
    status = await refused.next_status()
    assert status[0]["status"] == "max_connections" and "MAX_CLIENTS" in status[0]["message"]
    assert await refused.close_code() == 1013
    await keep[0].ws.aclose()
    await wait_until(lambda: len(filtered.hub.sessions) == 2)
    assert (await (await connect(nursery, filtered.port)).auth(CLIENT_KEY))[0]["status"] == "auth_success"

    _, _, per_ip = await chain(nursery, max_connections_per_ip=2)
    [await connect(nursery, per_ip.port) for _ in range(2)]
    third = await connect(nursery, per_ip.port)
    status = await third.next_status()
    assert status[0]["status"] == "max_connections" and "MAX_CONNECTIONS_PER_IP" in status[0]["message"]
    assert await third.close_code() == 1013


async def test_vanished_clients_leak_no_task_no_session_no_subscription(nursery, caplog):
    caplog.set_level(logging.INFO)  # so that an error logged by a vanishing client would be seen
    sim, firehose, filtered = await chain(nursery)
    neighbour = Neighbour(await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*"))
    nursery.start_soon(neighbour.run)
    await neighbour.wait_for_more()  # served: every task of its session and of the chain is running
    baseline = count_tasks()
    sessions_before = set(filtered.hub.sessions)
    references = []
    for round_ in range(20):
        raw, _ = await handshake(filtered.port)
        await send_all(raw, masked(json.dumps({"action": "auth", "params": CLIENT_KEY}))
                       + masked(json.dumps({"action": "subscribe", "params": f"T.AAPL,Q.S{round_}"})))
        await wait_until(lambda: len(filtered.hub.sessions) == len(sessions_before) + 1)
        session = next(iter(filtered.hub.sessions - sessions_before))
        await wait_until(lambda: len(filtered.registry.channels_of(session)) == 2)
        references.append(weakref.ref(session))
        del session
        # vanish: RST instead of a close frame
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()
    await wait_until(lambda: filtered.hub.sessions == sessions_before, what="sessions to end")
    await wait_until(lambda: count_tasks() == baseline, what="the task tree to shrink back")
    assert filtered.registry.subscribers() == {s for s in sessions_before}
    assert sum(filtered.hub.connections_per_ip.values()) == len(sessions_before)
    assert not [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]  # no tracebacks
    caplog.clear()  # captured log records hold their arguments (sessions) until the test ends
    gc.collect()
    assert all(reference() is None for reference in references), "a closed session is still referenced"
    await wait_until(lambda: "Q.S0" not in sim.subscribed_channels(), what="grace expiry upstream")
    await neighbour.wait_for_more()  # what was in flight meanwhile has arrived (and enough to judge)
    neighbour.assert_no_gap()


def _clean_close(sim, link):
    sim.drop_all()


def _abrupt_close(sim, link):
    sim.drop_all(abrupt=True)


def _silent_stall(sim, link):
    # only while this fault lasts does the link give up on a silent upstream within 1.5 s: a
    # short keepalive throughout would also give up whenever a busy machine delays a pong
    link.keepalive_timeout = FAST_KEEPALIVE["keepalive_timeout_seconds"]
    sim.faults.stall(3.0)


def _auth_failed(sim, link):
    sim.faults.refuse_auth = 1
    sim.drop_all()


def _max_connections(sim, link):
    sim.faults.force_max_connections = True
    sim.drop_all()


UPSTREAM_FAULTS = [_clean_close, _abrupt_close, _silent_stall, _auth_failed, _max_connections]


async def test_every_upstream_fault_is_survived_with_nothing_leaked(nursery, caplog):
    # connected first: a client that arrives earlier is told of the wait, which this test does not count
    sim, firehose, filtered = await start_chain(nursery, simulator=dict(events_per_second=1000),
                                                firehose=dict(static_channels=parse_channel_list("Q.*")))
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.AAPL,Q.MSFT")
    nursery.start_soon(client.collect, 120)
    await wait_until(lambda: sim.subscribed_channels() == {"Q.*", "T.AAPL"})
    await wait_until(lambda: len(client.events) > 10)
    baseline = count_tasks()
    sessions = set(filtered.hub.sessions)
    with caplog.at_level(logging.WARNING):
        for fault in UPSTREAM_FAULTS:
            outages = firehose.stats.outages
            fault(sim, firehose.link)
            await wait_until(lambda: firehose.stats.outages == outages + 1, what=f"{fault.__name__} noticed")
            sim.faults.force_max_connections = False
            firehose.link.keepalive_timeout = firehose.config.keepalive_timeout_seconds
            await wait_until(lambda: firehose.link.state.value == "connected",
                             what=f"recovery from {fault.__name__}")
            # subscriptions intact upstream and down, data flowing again, nothing leaked
            await wait_until(lambda: sim.subscribed_channels() == {"Q.*", "T.AAPL"}, what="re-subscription")
            assert filtered.hub.sessions == sessions
            assert {c.text for c in filtered.registry.channels_of(next(iter(sessions)))} == {"T.AAPL", "Q.MSFT"}
            count = len(client.events)
            await wait_until(lambda: len(client.events) > count + 5, what=f"data after {fault.__name__}")
            await wait_until(lambda: count_tasks() == baseline, what=f"the task tree after {fault.__name__}")
    assert firehose.stats.outages == len(UPSTREAM_FAULTS) and firehose.stats.outage_seconds > 0
    assert any("restored after" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)
    restored = [s["message"] for s in client.statuses if s["status"] == "upstream_connected"]
    assert len(restored) == len(UPSTREAM_FAULTS)
    assert all("restored after" in message and "lost" in message for message in restored)
    assert {(e["ev"], e["sym"]) for e in client.events} == {("T", "AAPL"), ("Q", "MSFT")}


async def test_the_polygon_key_reaches_no_client_and_no_log(nursery, caplog):
    with caplog.at_level(logging.DEBUG):
        sim, firehose, filtered = await chain(nursery)
        clients = [await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="T.*"),
                   await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*")]
        for client in clients:
            await client.collect(0.5)
        sim.drop_all()  # reconnects log the key's redaction, never the key
        await wait_until(lambda: firehose.link.reconnects >= 1 and firehose.link.state.value == "connected")
        refused = await connect(nursery, filtered.port)
        await refused.auth(POLYGON_KEY)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "Authenticated successfully" in text
    assert POLYGON_KEY not in text
    for client in clients:
        assert all(POLYGON_KEY not in frame for frame in client.frames)


async def test_tls_for_clients_and_a_verified_wss_upstream(nursery, certificates):
    sim = await start_simulator(nursery, events_per_second=1000)
    firehose = await start_tier(nursery, firehose_config(
        sim, tls_cert=certificates["cert"], tls_key=certificates["key"], static_channels=ALL_STREAM))
    trusted = await start_tier(nursery, filtered_config(
        firehose, upstream_url=f"wss://localhost:{firehose.port}", upstream_ca_file=certificates["ca"],
        tls_cert=certificates["cert"], tls_key=certificates["key"]))
    await wait_connected(trusted)  # a wss upstream, verified with the CA

    untrusting = await start_tier(nursery, filtered_config(firehose, upstream_url=f"wss://localhost:{firehose.port}"))
    await wait_until(lambda: untrusting.link.reconnects >= 1, what="a refused certificate")
    assert untrusting.link.state.value != "connected"
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.link.last_error or "certificate" in untrusting.link.last_error

    import ssl

    context = ssl.create_default_context(cafile=certificates["ca"])
    async with open_websocket_url(f"wss://localhost:{trusted.port}/stocks", ssl_context=context) as ws:
        client = Client(ws)
        await client.receive()
        assert (await client.auth(CLIENT_KEY))[0]["status"] == "auth_success"
        await client.request("subscribe", "T.*")
        assert {event["ev"] for event in await client.wait_events(5)} == {"T"}  # data over TLS at both hops
    with pytest.raises(Exception):  # a plain ws:// client gets no WebSocket from a TLS port
        async with open_websocket_url(f"ws://127.0.0.1:{trusted.port}/stocks", connect_timeout=2,
                                      disconnect_timeout=1):
            pass


async def test_tls_configuration_needs_both_files(monkeypatch, tmp_path, certificates):
    from proxy.app.config import load_filtered_config
    from proxy.core.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FILTERED_PROXY_TLS_CERT", certificates["cert"])
    with pytest.raises(ConfigError, match="FILTERED_PROXY_TLS_KEY"):
        load_filtered_config()
    monkeypatch.setenv("FILTERED_PROXY_TLS_KEY", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="no such file"):
        load_filtered_config()
