"""``python -m proxy.replay``: a recorded journal served as a Polygon upstream.

Recordings are made with the real journal writer from the simulator's own frames
(:class:`~proxy.sim.market.MarketModel`, :func:`~proxy.sim.market.frame_of`) at
receive times the test chooses, so that what each client must get is known exactly:
the recorded frames' events its channels select, byte for byte, one frame out per
recorded frame, in order. Pacing is checked exactly under Trio's MockClock (no
sockets), and through sockets only as "never early" (a lower bound holds on a busy
machine; an upper bound would not).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy.app.replay_config import load_replay_config, parse_speed
from proxy.core.errors import ConfigError, JournalDamaged, leaves
from proxy.core.journal import EventSelector, Journal, Record, frame_record, outage_record, RecordKind
from proxy.core.protocol import parse_channel_list
from proxy.core.settings import ReplayConfig, SimulatorConfig
from proxy.net.journal_store import list_segments, scan_file
from proxy.net.journal_writer import JournalWriter
from proxy.sim.market import MarketModel, frame_of, synthetic_symbols
from proxy.sim.replay import Replay, disk_blocks, main as replay_main, replay_records, run_replay
from proxy.sim.replay_schedule import ReplaySchedule
from proxy.sim.simulator import Faults, SimConnection, Simulator
from tests.helpers import (
    CLIENT_KEY,
    LIVENESS_SECONDS,
    POLYGON_KEY,
    authed_client,
    filtered_config,
    firehose_config,
    start_tier,
    wait_connected,
    wait_until,
)

ROOT = Path(__file__).parent.parent
START_NS = 1_764_000_000_000_000_000  # 2025-11-24T16:00:00Z
SUBSCRIBED = '[{"ev":"status","status":"success","message":"subscribed to: T.*"}]'


# --- recordings ----------------------------------------------------------------------------------------


def simulator_frames(count: int, *, seed: int = 3, gap_ms: int = 10) -> list[Record]:
    """``count`` frames of 1 to 5 simulator events, ``gap_ms`` apart, as FRAME records (bytes);
    a status frame (the recorder's subscribe answer) first."""
    model = MarketModel(synthetic_symbols(12), seed=seed)
    records = [frame_record(1, START_NS, SUBSCRIBED)]
    for index in range(count):
        events = model.stream_events(1 + index % 5, START_NS // 1_000_000 + index * gap_ms)
        records.append(frame_record(index + 2, START_NS + (index + 1) * gap_ms * 1_000_000, frame_of(events)))
    return records


def with_outage(records: list[Record], after: int, pause_ms: int) -> list[Record]:
    """``records`` with an upstream outage after the ``after``-th, shifting the rest by ``pause_ms``
    (no frame arrives during an outage)."""
    head, tail = records[:after], records[after:]
    lost_ns = head[-1].received_ns + 1_000_000
    shift = pause_ms * 1_000_000
    out = [*head, outage_record(RecordKind.UPSTREAM_LOST, 0, lost_ns, "upstream silent"),
           outage_record(RecordKind.UPSTREAM_RESTORED, 0, lost_ns + shift, "restored after a test outage")]
    out += [frame_record(0, record.received_ns + shift, record.data) for record in tail]
    return [Record(record.kind, seq, record.received_ns, record.data, seq) for seq, record in enumerate(out, 1)]


async def write_journal(directory: Path, records: list[Record], **writer_options) -> None:
    """Write ``records`` (their data and times; seqs are the journal's) with the real writer."""
    writer = JournalWriter(directory, retention_seconds=None, **writer_options)
    async with trio.open_nursery() as nursery:
        recovered = await nursery.start(writer.run)
        journal = Journal(next_seq=recovered.next_seq, not_before_ns=recovered.last_ns, sink=writer.offer)
        for index, record in enumerate(records):
            if record.kind is RecordKind.FRAME:
                journal.frame(record.data, record.received_ns)
            elif record.kind is RecordKind.UPSTREAM_LOST:
                journal.upstream_lost(record.reason, record.received_ns)
            else:
                journal.upstream_restored(record.reason, record.received_ns)
            if index % 50 == 49:
                await trio.sleep(0.06)  # several blocks
        await wait_until(lambda: writer.stats.records_written == len(records), what="the records on disk")
        nursery.cancel_scope.cancel()


def expected_frames(records: list[Record], channels: str, *, from_ns: int = 0, to_ns: int | None = None) -> list[bytes]:
    """What a connection holding ``channels`` must get: per recorded frame, its selected events as one frame."""
    selector = EventSelector(parse_channel_list(channels))
    frames = []
    for record in records:
        if record.kind is not RecordKind.FRAME or record.received_ns < from_ns or (
                to_ns is not None and record.received_ns >= to_ns):
            continue
        selected = selector.select(record.data)
        if selected:
            frames.append(b"[" + b",".join(selected) + b"]")
    return frames


def replay_config(directory: Path, **overrides) -> ReplayConfig:
    return ReplayConfig(journal_dir=str(directory), **{
        **dict(host="127.0.0.1", port=0, api_keys=frozenset({POLYGON_KEY}), max_connections=5, allow_star=True),
        **overrides})


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, list[Record]]:
    """300 simulator frames over 3 s, with a 1 s outage after the 150th: written once for the module."""
    directory = tmp_path_factory.mktemp("recording")
    records = with_outage(simulator_frames(300), after=151, pause_ms=1000)
    trio.run(write_journal, directory, records)
    return directory, records


def test_the_recording_is_on_disk_whole(recording):
    directory, records = recording
    segments = list_segments(directory)
    scans = [scan_file(segment.path, decode=True) for segment in segments]
    assert all(not scan.damage for scan in scans)
    assert sum(len(scan.blocks) for scan in scans) > 3  # several blocks: reading crosses them
    assert (scans[0].first_seq, scans[-1].last_seq) == (1, len(records))


# --- the schedule, without I/O ------------------------------------------------------------------------


def test_the_schedule_keeps_recorded_gaps_divided_by_the_speed():
    schedule = ReplaySchedule(start=100.0, speed=4.0)
    assert schedule.due(START_NS + 5_000_000_000) == 100.0  # the first record asked is due at the start
    assert schedule.due(START_NS + 7_000_000_000) == pytest.approx(100.5)
    assert schedule.due(START_NS + 5_000_000_000 + 1_000_000) == pytest.approx(100.00025)
    assert schedule.behind(101.0, START_NS + 7_000_000_000) == pytest.approx(0.5)
    assert schedule.behind(100.1, START_NS + 7_000_000_000) == 0.0
    flat_out = ReplaySchedule(start=3.0, speed=None)
    assert {flat_out.due(START_NS), flat_out.due(START_NS + 10**12)} == {3.0}
    with pytest.raises(ValueError):
        ReplaySchedule(start=0.0, speed=0.0)


def test_speeds_and_times_are_read_as_the_command_line_gives_them(monkeypatch, tmp_path):
    assert parse_speed("1") == 1.0 and parse_speed("2.5") == 2.5 and parse_speed("MAX") is None
    for bad in ("0", "-1", "fast", "inf", "nan"):
        with pytest.raises(ValueError):
            parse_speed(bad)
    (tmp_path / "empty.env").write_text("")
    monkeypatch.setenv("PROXY_ENV_FILE", str(tmp_path / "empty.env"))
    monkeypatch.setenv("REPLAY_SPEED", "3")
    monkeypatch.setenv("REPLAY_PORT", "9100")
    config = load_replay_config("/j", {"speed": "max", "from": "2025-11-24T16:00:00Z", "to": "-1000"},
                                now_ns=START_NS + 10**12)
    assert config.speed is None and config.port == 9100  # the option wins over the variable
    assert config.from_ns == START_NS and config.to_ns == START_NS + 10**12 - 10**9
    assert config.server().frame_events == 1 and config.server().port == 9100  # never merged
    assert load_replay_config("/j").speed == 3.0
    with pytest.raises(ConfigError, match="--speed"):
        load_replay_config("/j", {"speed": "fast"})
    with pytest.raises(ConfigError, match="REPLAY_SPEED"):
        monkeypatch.setenv("REPLAY_SPEED", "0")
        load_replay_config("/j")
    with pytest.raises(ConfigError, match="--to"):
        load_replay_config("/j", {"speed": "1", "from": "2000", "to": "1000"})
    with pytest.raises(ConfigError, match="REPLAY_FROM.*not valid.*ISO 8601"):
        monkeypatch.setenv("REPLAY_FROM", "yesterday")
        load_replay_config("/j", {"speed": "1"})


# --- pacing under MockClock: the feeder and the connections' queues, no sockets -------------------------


def fake_simulator(*channel_lists: str) -> tuple[Simulator, list[SimConnection]]:
    simulator = Simulator(config=SimulatorConfig(), model=MarketModel(("AAPL",), seed=1), faults=Faults())
    connections = []
    for number, channels in enumerate(channel_lists, 1):
        connection = SimConnection(id=number)
        for channel in parse_channel_list(channels):
            connection.add(channel)
        simulator.connections.add(connection)
        connections.append(connection)
    return simulator, connections


def in_memory(records: list[Record], per_block: int = 7):
    async def blocks():
        for offset in range(0, len(records), per_block):
            yield records[offset:offset + per_block]
    return blocks


async def take_with_times(connection: SimConnection, into: list[tuple[float, bytes]]) -> None:
    """What the simulator's writer does with a connection's queue, noting the Trio time of each frame."""
    while True:
        while not connection.pending:
            connection.wake = trio.Event()
            await connection.wake.wait()
        _count, payload = connection.pending.popleft()
        connection.pending_events -= _count
        into.append((trio.current_time(), payload))


@pytest.mark.parametrize("speed", [1.0, 10.0])
async def test_each_frame_goes_out_at_its_recorded_time_divided_by_the_speed(autojump_clock, speed):
    records = with_outage(simulator_frames(40, gap_ms=25), after=21, pause_ms=2000)
    simulator, (connection,) = fake_simulator("*")
    replay = Replay(replay_config(Path("/unused"), speed=speed))
    replay.simulator = simulator
    sent: list[tuple[float, bytes]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_with_times, connection, sent)
        start = trio.current_time()
        nursery.start_soon(replay_records, replay, in_memory(records))
        await replay.finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    frames = [record for record in records if record.kind is RecordKind.FRAME][1:]  # the status frame: nothing
    assert [payload for _, payload in sent] == [record.data for record in frames]  # `*`: each frame verbatim
    first_ns = records[0].received_ns  # the first record (the status frame) starts the clock
    for (at, _), record in zip(sent, frames):
        assert at - start == pytest.approx((record.received_ns - first_ns) / 1e9 / speed, abs=1e-6)
    # the outage is the pause it was, divided by the speed
    assert sent[20][0] - sent[19][0] == pytest.approx((2.0 + 0.025) / speed, abs=1e-6)


async def test_star_gets_a_recorded_frame_as_recorded_and_statuses_are_never_replayed(autojump_clock):
    spaced = b'[{"ev":"T","sym":"AAPL","p":1}, {"ev":"Q","sym":"MSFT","bp":2}]'  # whitespace kept for `*`
    mixed = b'[{"ev":"status","status":"success","message":"x"},{"ev":"T","sym":"MSFT","p":3}]'
    broken = b'[{"ev":"T","sym":"AAPL","p":'
    records = [frame_record(1, START_NS, spaced), frame_record(2, START_NS + 1, broken),
               frame_record(3, START_NS + 2, mixed)]
    simulator, (star, trades) = fake_simulator("*", "T.*")
    replay = Replay(replay_config(Path("/unused"), speed=None))
    replay.simulator = simulator
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replay_records, replay, in_memory(records))
        await replay.finished.wait()
        nursery.cancel_scope.cancel()
    assert list(star.pending) == [(2, spaced), (1, b'[{"ev":"T","sym":"MSFT","p":3}]')]
    assert list(trades.pending) == [(1, b'[{"ev":"T","sym":"AAPL","p":1}]'), (1, b'[{"ev":"T","sym":"MSFT","p":3}]')]
    assert replay.bad_frames == 1 and replay.frames == 3


async def test_at_full_speed_the_slowest_reader_sets_the_pace(autojump_clock):
    records = simulator_frames(3000, gap_ms=1000)  # 50 minutes recorded
    simulator, (fast, slow) = fake_simulator("*", "T.*")
    replay = Replay(replay_config(Path("/unused"), speed=None))
    replay.simulator = simulator
    quick: list[tuple[float, bytes]] = []
    most_queued = 0

    async def read_slowly() -> None:
        nonlocal most_queued
        while True:
            await trio.sleep(0.01)
            most_queued = max(most_queued, slow.pending_events)
            while slow.pending:
                slow.pending_events -= slow.pending.popleft()[0]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_with_times, fast, quick)
        nursery.start_soon(read_slowly)
        start = trio.current_time()
        nursery.start_soon(replay_records, replay, in_memory(records, per_block=100))
        await replay.finished.wait()
        nursery.cancel_scope.cancel()
    assert len(quick) == 3000
    assert trio.current_time() - start < 60  # not the 50 minutes recorded: as fast as taken...
    assert most_queued <= 20_000 + 5  # ... and never more queued than the bound (plus one frame)
    assert not slow.drop.is_set()


# --- through sockets ----------------------------------------------------------------------------------


async def subscribed_client(nursery: trio.Nursery, port: int, channels: str, key: str = POLYGON_KEY):
    return await authed_client(nursery, port, key, subscribe=channels)


async def read_frames(client, count: int) -> list[bytes]:
    """The next ``count`` data frames, as the bytes received."""
    frames: list[bytes] = []
    with trio.fail_after(LIVENESS_SECONDS * 3):
        while len(frames) < count:
            message = await client.ws.get_message()
            if '"ev":"status"' not in message:
                frames.append(message.encode())
    return frames


async def test_each_client_gets_its_channels_events_byte_for_byte_in_the_recorded_framing(recording):
    directory, records = recording
    both_subscribed = trio.Event()

    async def when_both_subscribed():
        """The journal from disk, once both clients hold their channels (the replay starts at the
        first subscribe, and the second client must not miss the first frames)."""
        await both_subscribed.wait()
        async for block in disk_blocks(str(directory)):
            yield block

    async with trio.open_nursery() as nursery:
        replay: Replay = await nursery.start(functools.partial(
            run_replay, replay_config(directory, speed=8.0), blocks=when_both_subscribed))
        wide = await subscribed_client(nursery, replay.port, "*")
        narrow = await subscribed_client(nursery, replay.port, "T.AAPL,Q.*,Q.MSFT")
        both_subscribed.set()
        owed_wide = expected_frames(records, "*")
        owed_narrow = expected_frames(records, "T.AAPL,Q.*")
        got_wide = await read_frames(wide, len(owed_wide))
        got_narrow = await read_frames(narrow, len(owed_narrow))
        nursery.cancel_scope.cancel()
    assert got_wide == owed_wide and got_narrow == owed_narrow
    # the `*` frames are the recorded frames themselves (no status inside them)
    assert got_wide == [record.data for record in records if record.kind is RecordKind.FRAME][1:]


async def read_until_mark(client) -> list[bytes]:
    """Data frames up to the simulator's BENCH.MARK, which is queued behind everything replayed."""
    frames: list[bytes] = []
    with trio.fail_after(LIVENESS_SECONDS * 3):
        while True:
            message = await client.ws.get_message()
            if '"ev":"BENCH"' in message:
                return frames
            if '"ev":"status"' not in message:
                frames.append(message.encode())


async def test_a_replay_is_never_early_and_a_subscribe_changes_what_follows(recording):
    directory, records = recording
    speed = 4.0
    span = (records[-1].received_ns - records[0].received_ns) / 1e9 / speed  # 1 s
    async with trio.open_nursery() as nursery:
        replay: Replay = await nursery.start(run_replay, replay_config(directory, speed=speed))
        client = await authed_client(nursery, replay.port, POLYGON_KEY)
        subscribed_at = trio.current_time()
        await client.send("subscribe", "T.*,BENCH.MARK")
        got = await read_frames(client, 60)
        await client.send("subscribe", "Q.AAPL")
        await replay.finished.wait()
        finished_at = trio.current_time()
        replay.simulator.mark()
        got += await read_until_mark(client)
        nursery.cancel_scope.cancel()
    assert finished_at - subscribed_at >= span * 0.99  # at most 4x the recorded pace
    # up to some recorded frame, T.*; from there on, T.* and Q.AAPL: nothing lost, nothing extra
    splits = [cut for cut in range(len(records) + 1)
              if got == expected_frames(records[:cut], "T.*") + expected_frames(records[cut:], "T.*,Q.AAPL")]
    assert splits and got != expected_frames(records, "T.*")


async def test_from_and_to_cut_the_recording_by_receive_time(recording):
    directory, records = recording
    from_ns, to_ns = records[60].received_ns, records[240].received_ns
    async with trio.open_nursery() as nursery:
        replay: Replay = await nursery.start(run_replay, replay_config(
            directory, speed=None, from_ns=from_ns, to_ns=to_ns))
        client = await subscribed_client(nursery, replay.port, "T.*,Q.*")
        owed = expected_frames(records, "T.*,Q.*", from_ns=from_ns, to_ns=to_ns)
        got = await read_frames(client, len(owed))
        await replay.finished.wait()
        with trio.move_on_after(0.3):
            got += await read_frames(client, 1)  # nothing more may come
        nursery.cancel_scope.cancel()
    assert got == owed and len(owed) < len(expected_frames(records, "T.*,Q.*"))


async def test_outages_are_replayed_as_statuses_where_they_happened_when_asked(recording):
    directory, records = recording
    async with trio.open_nursery() as nursery:
        replay: Replay = await nursery.start(run_replay, replay_config(directory, speed=None, outage_statuses=True))
        client = await subscribed_client(nursery, replay.port, "*")
        frames = []
        with trio.fail_after(LIVENESS_SECONDS * 3):
            while len([f for f in frames if '"status"' not in f]) < 300:
                frames.append(await client.ws.get_message())
        nursery.cancel_scope.cancel()
    statuses = [index for index, frame in enumerate(frames) if '"ev":"status"' in frame]
    assert len(statuses) == 2  # the recorded outage, nothing else: the recorded status frame is not replayed
    lost, restored = (json.loads(frames[index])[0] for index in statuses)
    assert lost["status"] == "upstream_disconnected" and "upstream silent" in lost["message"]
    assert restored["status"] == "upstream_connected"
    assert statuses == [150, 151]  # after the 150 data frames recorded before the outage
    assert replay.outages == 1


async def test_a_firehose_and_a_filtered_proxy_on_the_replay_deliver_exactly_the_recorded_events(recording):
    directory, records = recording
    channels = "T.*,Q.AAPL,Q.MSFT"
    async with trio.open_nursery() as nursery:
        replay: Replay = await nursery.start(run_replay, replay_config(directory, speed=10.0, outage_statuses=True))
        firehose = await start_tier(nursery, firehose_config(replay.simulator))
        filtered = await start_tier(nursery, filtered_config(firehose))
        await wait_connected(firehose, filtered)
        client = await subscribed_client(nursery, filtered.port, channels, key=CLIENT_KEY)
        owed = [event for frame in expected_frames(records, channels) for event in json.loads(frame)]
        await client.wait_events(len(owed), timeout=LIVENESS_SECONDS * 3)
        await replay.finished.wait()
        nursery.cancel_scope.cancel()
    assert replay.started.is_set() and client.events == owed  # each once, in order, nothing else
    # the recorded outage reached the client through both tiers, as the statuses it was
    assert [s["status"] for s in client.statuses if s["status"].startswith("upstream_")][-2:] == [
        "upstream_disconnected", "upstream_connected"]


# --- damage and errors ---------------------------------------------------------------------------------


def flip_a_byte_in_block(directory: Path, block: int) -> str:
    segment = list_segments(directory)[0]
    span = scan_file(segment.path).blocks[block]
    data = bytearray(segment.path.read_bytes())
    data[span.offset + 80] ^= 0xFF  # inside the payload
    segment.path.write_bytes(bytes(data))
    return segment.name


async def test_damage_reached_stops_the_replay_naming_the_segment(recording, tmp_path):
    directory, records = recording
    copy = tmp_path / "damaged"
    copy.mkdir()
    for segment in list_segments(directory):
        (copy / segment.name).write_bytes(segment.path.read_bytes())
    name = flip_a_byte_in_block(copy, 2)
    with pytest.raises(BaseException) as raised:
        async with trio.open_nursery() as nursery:
            replay: Replay = await nursery.start(run_replay, replay_config(copy, speed=None))
            await subscribed_client(nursery, replay.port, "*")
            await trio.sleep(LIVENESS_SECONDS)
    damage = [error for error in leaves(raised.value) if isinstance(error, JournalDamaged)]
    assert damage, raised.value
    assert name in str(damage[0]) and "checksum mismatch" in str(damage[0]) and "seqs" in str(damage[0])


async def test_an_empty_range_or_directory_is_a_configuration_error(recording, tmp_path):
    directory, records = recording
    with pytest.raises(ConfigError, match="no journal segments"):
        await run_replay(replay_config(tmp_path))
    with pytest.raises(ConfigError, match="holds nothing received from"):
        await run_replay(replay_config(directory, from_ns=records[-1].received_ns + 1))


def cli_env(**env: str) -> dict[str, str]:
    """The environment of a replay started by a test: this worktree's package, no REPLAY_* of the caller's."""
    inherited = {name: value for name, value in os.environ.items() if not name.startswith(("REPLAY_", "PROXY_ENV"))}
    return {**inherited, "PYTHONPATH": str(ROOT), **env}


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.replay", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd=cwd, env=cli_env(**env))


def test_the_command_line_says_what_is_wrong(recording, tmp_path, monkeypatch, capsys):
    directory, _ = recording
    monkeypatch.chdir(tmp_path)  # no .env
    assert replay_main([str(directory), "--speed", "warp"]) == 2
    assert "--speed: 'warp' is not valid" in capsys.readouterr().err
    monkeypatch.setenv("REPLAY_PORT", "x")
    assert replay_main([str(directory)]) == 2
    assert "REPLAY_PORT: 'x' is not valid" in capsys.readouterr().err
    empty = run_cli(str(tmp_path), "--port", "0", cwd=tmp_path)
    assert empty.returncode == 2 and "JOURNAL_DIR: no journal segments in" in empty.stderr
    copy = tmp_path / "damaged"
    copy.mkdir()
    for segment in list_segments(directory):
        (copy / segment.name).write_bytes(segment.path.read_bytes())
    name = flip_a_byte_in_block(copy, 0)
    damaged = run_cli(str(copy), "--port", "0", cwd=tmp_path)
    assert damaged.returncode == 1, damaged.stderr
    assert name in damaged.stderr and "DAMAGED bytes" in damaged.stderr


def test_the_command_line_serves_a_plain_websockets_client(recording, tmp_path):
    """`python -m proxy.replay DIR --port 0` prints its port; a client written with the
    `websockets` library (as README shows) gets the recording; SIGTERM stops it with 0."""
    from websockets.sync.client import connect

    directory, records = recording
    process = subprocess.Popen([sys.executable, "-m", "proxy.replay", str(directory), "--port", "0", "--speed",
                                "max", "--api-keys", "k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path, env=cli_env())
    try:
        port = int(process.stdout.readline())
        owed = expected_frames(records, "Q.*")
        got = []
        with connect(f"ws://127.0.0.1:{port}/stocks", open_timeout=LIVENESS_SECONDS) as ws:
            assert json.loads(ws.recv(LIVENESS_SECONDS))[0]["status"] == "connected"
            ws.send(json.dumps({"action": "auth", "params": "k"}))
            assert json.loads(ws.recv(LIVENESS_SECONDS))[0]["status"] == "auth_success"
            ws.send(json.dumps({"action": "subscribe", "params": "Q.*"}))
            assert json.loads(ws.recv(LIVENESS_SECONDS))[0]["message"] == "subscribed to: Q.*"
            while len(got) < len(owed):
                got.append(ws.recv(LIVENESS_SECONDS * 3).encode())
        assert got == owed
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=LIVENESS_SECONDS) == 0
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate()
    assert "replaying" in stderr and "a client subscribed: replay started" in stderr
