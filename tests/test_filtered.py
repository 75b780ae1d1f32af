"""The filtered proxy end to end: simulator → firehose → filtered proxy → clients."""

import json
import random
import subprocess
import sys
from pathlib import Path

import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.helpers import (
    CLIENT_KEY,
    authed_client,
    connect,
    filtered_config,
    firehose_config,
    raw_events,
    selects,
    start_chain,
    start_simulator,
    start_tier,
    wait_until,
)

CLIENTS = Path(__file__).parent / "clients"


async def test_two_clients_through_two_tiers_get_only_their_symbols(nursery):
    sim, firehose, filtered = await start_chain(nursery, simulator=dict(events_per_second=4000))
    a = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.AAPL")
    b = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.GOOGL")
    await wait_until(lambda: sim.subscribed_channels() == {"T.AAPL", "T.GOOGL"}, what="Polygon demand")
    assert {(e["ev"], e["sym"]) for e in await a.wait_events(20)} == {("T", "AAPL")}
    assert {(e["ev"], e["sym"]) for e in await b.wait_events(20)} == {("T", "GOOGL")}
    # the firehose holds * for the filtered proxy, but * never reaches Polygon
    assert "*" not in sim.subscribed_channels()
    assert firehose.registry.everything_subscribers



def _between_marks(events: list[dict], first: int, last: int) -> list[dict]:
    """The data events a client received between the simulator's marks ``first`` and ``last``."""
    marks = [i for i, e in enumerate(events) if e.get("ev") == "BENCH" and e.get("n") in (first, last)]
    assert len(marks) == 2, f"marks {first} and {last} not both received"
    return [e for e in events[marks[0] + 1:marks[1]] if e.get("ev") != "BENCH"]


async def _compare_with_reference(nursery, sim, filtered, subscriptions):
    """Every client's events equal the reference filter over a `*` client's stream.

    The window is delimited in-band by the simulator's marks, which every client
    receives in order with its data (each also subscribes to BENCH.*), so the
    comparison holds however late delivery runs on a busy machine.
    """
    reference = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="*")
    clients = [await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe=params + ",BENCH.*")
               for params in subscriptions]
    everyone = [reference, *clients]
    counted = sim.window_events
    sim.mark()
    first = sim.marks
    # the window's length only sets how many events are compared
    await wait_until(lambda: sim.window_events - counted >= 3000, what="3000 events sent in the window")
    sim.mark()
    last = sim.marks

    async def read_to_last_mark(client):
        seen = 0
        with trio.fail_after(180):  # 100 clients read in one process: minutes on a loaded machine
            while not any(e.get("ev") == "BENCH" and e.get("n") == last for e in client.events[seen:]):
                seen = len(client.events)
                await client.receive()

    async with trio.open_nursery() as readers:
        for client in everyone:
            readers.start_soon(read_to_last_mark, client)
    expected_stream = _between_marks(reference.events, first, last)
    assert len(expected_stream) > 1000
    for client, params in zip(clients, subscriptions):
        expected = [e for e in expected_stream if selects(params, e)]
        assert _between_marks(client.events, first, last) == expected, params
    return clients


async def test_overlapping_star_type_and_symbol_channels_without_duplicates(nursery):
    sim, _, filtered = await start_chain(nursery)
    await _compare_with_reference(nursery, sim, filtered, ["T.*,T.AAPL", "*,T.AAPL", "T.AAPL,Q.AAPL,Q.*"])


async def test_a_hundred_clients_match_the_reference_filter(nursery):
    # 100 test clients in one process are read one at a time while the others are set up: on a
    # loaded machine one may not read for longer than the tier's ping allows (closed 1011 as gone).
    sim, _, filtered = await start_chain(nursery, simulator=dict(events_per_second=2000, symbols=30),
                                         filtered=dict(client_ping_seconds=600))
    rnd = random.Random(1234)
    symbols = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "SPY", "QQQ", "AAA", "AAB", "AAC"]
    subscriptions = []
    for _ in range(100):
        channels = {f"{rnd.choice(['T', 'Q', 'LULD', 'FMV'])}.{rnd.choice(symbols)}"
                    for _ in range(rnd.randint(1, 8))}
        if rnd.random() < 0.05:
            channels.add(rnd.choice(["T.*", "Q.*", "*"]))
        subscriptions.append(",".join(sorted(channels)))
    await _compare_with_reference(nursery, sim, filtered, subscriptions)


async def test_clients_receive_original_bytes_as_json_array_frames(nursery):
    sim, _, filtered = await start_chain(nursery)
    sim.record_frames = True
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.AAPL,Q.MSFT")
    await client.wait_events(50)
    sent_events = set()
    for frame in sim.sent_frames[1]:
        sent_events.update(json.dumps(e, separators=(",", ":")) for e in json.loads(frame))
    data_frames = [f for f in client.frames if '"ev":"status"' not in f]
    assert data_frames
    for frame in data_frames:
        assert frame.startswith("[{") and frame.endswith("}]")
        for event in json.loads(frame):
            # re-serialised compactly, each event is byte-identical to what the simulator sent
            assert json.dumps(event, separators=(",", ":")) in sent_events


async def test_through_two_coalescing_tiers_each_event_arrives_byte_for_byte_in_upstream_order(nursery):
    """One event per upstream frame, both tiers writing at most every 20 ms: the client's frames hold
    exactly the events it selected, the very bytes the simulator sent, in the simulator's order."""
    sim, _, filtered = await start_chain(
        nursery, simulator=dict(events_per_second=1000, frame_events=1),
        firehose=dict(client_flush_ms=20), filtered=dict(client_flush_ms=20))
    sim.record_frames = True
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.*,Q.AAPL")
    with trio.fail_after(60):
        while len(raw_events(client.frames)) < 200:
            await client.receive()
    received = raw_events(client.frames)
    sent = [raw for raw in raw_events(sim.sent_frames[1])
            if selects("T.*,Q.AAPL", json.loads(raw))]
    start = sent.index(received[0])
    assert received == sent[start:start + len(received)]
    data_frames = [frame for frame in client.frames if '"ev":"status"' not in frame]
    assert len(data_frames) < len(received)  # coalesced


async def test_paths_and_pre_auth_rules(nursery):
    _, _, filtered = await start_chain(nursery, simulator=dict(events_per_second=50))
    root = await connect(nursery, filtered.port, path="/")
    assert (await root.request("subscribe", "T.AAPL"))[0]["status"] == "error"  # before auth: kept
    assert (await root.auth(CLIENT_KEY))[0]["status"] == "auth_success"
    # A market not served: answered as Polygon answers a key without the market (a client
    # written for Polygon stops with the message instead of retrying a 404 forever).
    other = await connect(nursery, filtered.port, path="/options")
    refused = await other.auth(CLIENT_KEY)
    assert refused[0]["status"] == "auth_failed"
    assert "does not serve the options market" in refused[0]["message"] and "/stocks" in refused[0]["message"]
    assert await other.close_code() == 1008


async def test_auth_timeout_on_the_proxy(nursery):
    _, _, filtered = await start_chain(nursery, simulator=dict(events_per_second=50),
                                       filtered=dict(auth_timeout_seconds=0.3))
    client = await connect(nursery, filtered.port)
    assert (await client.next_status())[0]["status"] == "auth_timeout"
    assert await client.close_code() == 1008


async def _run_client(args, timeout=30):
    result = await trio.run_process(
        [sys.executable, *map(str, args)], capture_stdout=True, capture_stderr=True, check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


async def test_plain_websockets_client_works_unchanged(nursery):
    _, _, filtered = await start_chain(nursery, simulator=dict(events_per_second=3000))
    with trio.fail_after(30):
        lines = await _run_client([CLIENTS / "plain_websockets_client.py",
                                   f"ws://127.0.0.1:{filtered.port}", CLIENT_KEY, "T.AAPL", 20])
    assert json.loads(lines[0])[0]["status"] == "connected"
    assert json.loads(lines[1])[0]["status"] == "auth_success"
    events = [e for line in lines[2:] for e in json.loads(line) if e["ev"] != "status"]
    assert len(events) >= 20 and {(e["ev"], e["sym"]) for e in events} == {("T", "AAPL")}


async def test_official_massive_client_works_unchanged(nursery):
    _, _, filtered = await start_chain(nursery, simulator=dict(events_per_second=3000))
    with trio.fail_after(30):
        lines = await _run_client([CLIENTS / "massive_client.py", f"127.0.0.1:{filtered.port}",
                                   CLIENT_KEY, "T.AAPL,Q.MSFT", 30])
    # the library prints its own remarks to stdout too (seen on a loaded machine): ours are JSON arrays
    parsed = [json.loads(line) for line in lines if line.startswith("[")]
    assert len(parsed) >= 30, lines
    assert {tuple(p) for p in parsed} <= {
        ("T", "AAPL", "EquityTrade"), ("Q", "MSFT", "EquityQuote"),
        ("EventType.EquityTrade", "AAPL", "EquityTrade"), ("EventType.EquityQuote", "MSFT", "EquityQuote"),
    }


async def test_two_filtered_proxies_share_one_upstream_connection(nursery):
    sim, firehose, first = await start_chain(nursery)
    second = await start_tier(nursery, filtered_config(firehose))
    a = await authed_client(nursery, first.port, CLIENT_KEY, subscribe="T.AAPL")
    b = await authed_client(nursery, second.port, CLIENT_KEY, subscribe="Q.MSFT")
    await wait_until(lambda: sim.subscribed_channels() == {"T.AAPL", "Q.MSFT"})
    assert {e["sym"] for e in await a.wait_events(20)} == {"AAPL"}
    assert {e["sym"] for e in await b.wait_events(20)} == {"MSFT"}
    assert sim.connections_total == 1


async def test_firehose_restart_mid_stream_keeps_clients_and_subscriptions(nursery):
    sim = await start_simulator(nursery, events_per_second=2000)
    firehose_scope = trio.CancelScope()

    async def run_firehose(config, task_status=trio.TASK_STATUS_IGNORED):
        from proxy.app.tier import run_tier

        with firehose_scope:
            await run_tier(config, task_status=task_status)

    firehose = await nursery.start(run_firehose, firehose_config(sim))
    filtered = await start_tier(nursery, filtered_config(firehose))
    client = await authed_client(nursery, filtered.port, CLIENT_KEY, subscribe="T.AAPL,Q.AAPL")
    await client.wait_events(10)

    firehose_scope.cancel()  # the firehose process dies
    await client.wait_status("upstream_disconnected")
    await trio.sleep(0.3)  # down a while: the filtered proxy's reconnects find nobody
    firehose_scope = trio.CancelScope()
    await nursery.start(run_firehose, firehose_config(sim, port=firehose.port))  # restarted
    await client.wait_status("upstream_connected")
    await client.more_events(10)  # same client connection, data again
    assert {(e["ev"], e["sym"]) for e in client.events} <= {("T", "AAPL"), ("Q", "AAPL")}
    await wait_until(lambda: sim.subscribed_channels() == {"T.AAPL", "Q.AAPL"}, what="re-subscription")
