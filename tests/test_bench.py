"""The benchmark harness (bench/): its options, how it splits and merges client processes, its report.

These run in the default suite because they start nothing; the one real run is marked slow.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest

from bench.client_process import CLOSE, PING, TEXT, FrameReader, client_frame, histogram, percentile
from bench.runner import collect_answers, merged_latency, parse_arguments, split_plan, table, warnings


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_frame_reader_cuts_the_tiers_frames_at_every_length_boundary_however_the_bytes_arrive(size):
    from proxy.net.frames import text_frame

    payloads = [b"A" * size, b'[{"ev":"T"}]', bytes([97 + n % 26 for n in range(size)])]
    stream = b"".join(text_frame(payload) for payload in payloads)
    assert FrameReader().feed(stream) == [(TEXT, payload) for payload in payloads]
    reader, got = FrameReader(), []
    for start in range(0, len(stream), 997):  # cut anywhere, headers included
        got += reader.feed(stream[start:start + 997])
    assert got == [(TEXT, payload) for payload in payloads]


def test_frame_reader_joins_fragments_and_passes_control_frames_between_them():
    first, ping, last = b"\x01\x03abc", b"\x89\x01p", b"\x80\x02de"  # TEXT not final, PING, final CONTINUATION
    reader = FrameReader()
    assert reader.feed(first + ping) == [(PING, b"p")]
    assert reader.feed(last + b"\x88\x00") == [(TEXT, b"abcde"), (CLOSE, b"")]


@pytest.mark.parametrize("size", [5, 200, 70_000])
def test_client_frames_are_masked_and_read_back_by_a_websocket_server(size):
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    server, client = WSConnection(ConnectionType.SERVER), WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="x", target="/")))
    assert isinstance(next(server.events()), Request)
    server.send(AcceptConnection())
    payload = ("x" * size).encode()
    frame = client_frame(TEXT, payload)
    assert frame[1] & 0x80 and frame.count(payload) == 0  # masked: the text is not on the wire
    server.receive_data(frame)
    assert "".join(e.data for e in server.events() if isinstance(e, TextMessage)) == "x" * size


def test_frame_events_and_framings_are_parsed_as_the_simulator_reads_them():
    args = parse_arguments([])
    assert (args.frame_events, args.framings, args.client_processes) == ("tick", None, 2)
    assert parse_arguments(["--frame-events", "1"]).frame_events == 1
    assert parse_arguments(["--frame-events", "Adaptive"]).frame_events == "adaptive"
    assert parse_arguments(["--framings", "1,10,200"]).framings == [1, 10, 200]
    assert parse_arguments(["--framings", "adaptive,tick"]).framings == ["adaptive", "tick"]
    assert parse_arguments(["--scenario", "idle", "--frame-events", "10"]).clients == 1000


@pytest.mark.parametrize("argv", [["--frame-events", "0"], ["--frame-events", "1001"], ["--framings", "1,x"],
                                  ["--framings", ","], ["--client-processes", "0"]])
def test_bad_framing_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_arguments(argv)
    assert exited.value.code == 2
    assert "scripts/bench: error:" in capsys.readouterr().err


def test_split_plan_covers_every_client_once_and_spreads_them():
    plan = [f"T.S{n}" for n in range(10)]
    chunks = split_plan(plan, 3)
    assert [len(chunk) for chunk in chunks] == [4, 3, 3]
    assert sorted(sum(chunks, [])) == sorted(plan)
    assert split_plan(plan[:2], 4) == [["T.S0"], ["T.S1"]]  # no empty client process
    assert split_plan(plan, 1) == [plan]


def test_merged_latency_equals_the_percentiles_of_all_samples_to_a_tenth_of_a_ms():
    rnd = random.Random(5)
    processes = [[rnd.expovariate(1 / 8) for _ in range(n)] for n in (3000, 500, 1200)]
    merged = merged_latency([histogram(values) for values in processes])
    every = [value for values in processes for value in values]
    for key, fraction in (("p50", 0.50), ("p99", 0.99)):
        assert percentile(every, fraction) - 0.1 < merged[key] <= percentile(every, fraction)
    assert max(every) - 0.1 < merged["max"] <= max(every)
    assert merged["samples"] == len(every)
    assert merged_latency([{}, {}])["p50"] is None


def _result(**overrides):
    result = {
        "scenario": "filtered", "frame_events": "10", "events_per_frame": 9.1, "clients": 100,
        "rate_offered": 20000, "into_firehose_per_s": 18000, "delivered_per_s": 780000, "lost_events": 0,
        "latency_ms": {"p50": 6.2, "p99": 19.0, "max": 40.0}, "join_ms": [12.0, 14.5],
        "cpu_us_per_input_event": {"firehose": 2.5, "filtered": 15.1},
        "client_cpu_percent": [48.0, 51.0], "cpu_percent": {"simulator": 20.0},
        "peak_rss_mb": {"firehose": 35.0, "filtered": 41.0}, "simulator_events_skipped": 0,
        "clients_complete": 100, "client_processes_stopped": [],
        "machine_cpu_percent": 150.0, "other_cpu_percent": 5.0,
        "upstream_link_drops": {"firehose": 0, "filtered": 0}, "simulator_slow_consumer_drops": 0,
    }
    return {**result, **overrides}


def test_the_table_shows_the_framing_and_the_clients_cpu():
    rows = table([_result(), _result(frame_events="1", events_per_frame=1.0)]).splitlines()
    assert all(column in rows[0] for column in ("framing", "ev/frame", "client CPU %", "others CPU %"))
    assert rows[2].split()[:3] == ["filtered", "10", "9.1"] and "48+51" in rows[2]
    assert rows[3].split()[:3] == ["filtered", "1", "1.0"]


def test_warnings_name_a_saturated_client_process_and_a_simulator_that_fell_behind():
    assert warnings(_result()) == []
    found = warnings(_result(client_cpu_percent=[60.0, 97.0], simulator_events_skipped=1500))
    assert len(found) == 2
    assert "client process 2 used 97%" in found[0] and "--client-processes" in found[0]
    assert "1,500 events skipped" in found[1]


def test_warnings_name_other_processes_that_took_the_cpu():
    found = warnings(_result(machine_cpu_percent=195.0, other_cpu_percent=80.0))
    assert len(found) == 1 and "other processes on this machine used 80% of a core" in found[0]


def test_machine_busy_seconds_grows_with_work():
    from bench.runner import machine_busy_seconds

    before = machine_busy_seconds()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert machine_busy_seconds() - before >= 0.2  # at least our own work (ticks are 10 ms)


def test_warnings_name_what_makes_loss_and_latency_the_harness_gave_up_on():
    found = warnings(_result(clients_complete=90, client_processes_stopped=["clients-1"],
                             upstream_link_drops={"firehose": 1, "filtered": 2}, simulator_slow_consumer_drops=1))
    assert "10 of 100 clients did not see the closing mark" in found[0]
    assert "firehose's upstream link went down 1 time" in found[1]
    assert "filtered's upstream link went down 2 time" in found[2]
    assert "slow consumer 1 time" in found[3]


def test_collect_answers_tells_the_late_to_stop_and_still_gets_their_answer():
    import subprocess

    prompt = "import json, time; print(json.dumps({'n': 1}), flush=True); time.sleep(60)"
    late = ("import json, signal; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1]); "
            "signal.sigwait([signal.SIGUSR1]); print(json.dumps({'n': 2}), flush=True)")
    processes = {name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
                 for name, code in (("prompt", prompt), ("late", late))}
    try:
        answers, stopped = collect_answers(processes, wait=3)
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    assert answers == {"prompt": {"n": 1}, "late": {"n": 2}} and stopped == ["late"]


@pytest.mark.slow
def test_a_short_benchmark_at_two_framings_records_them(tmp_path):
    """The whole harness, briefly: every process, two framings, exact loss, the framing in the JSON."""
    import subprocess

    output = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, "-m", "bench.runner", "--framings", "1,10", "--rate", "2000", "--clients", "6",
         "--client-processes", "2", "--duration", "2", "--warmup", "1", "--prebuilt", "20000",
         "--json", str(output)],
        check=True, timeout=300, capture_output=True, cwd=Path(__file__).parent.parent,
    )
    results = json.loads(output.read_text())["results"]
    assert [r["frame_events"] for r in results] == ["1", "10"]
    for r in results:
        assert r["lost_events"] == 0 and r["clients_complete"] == 6
        assert r["client_processes"] == 2 and len(r["client_cpu_percent"]) == 2
    assert results[0]["events_per_frame"] == 1.0  # frames of one event hold one event, whatever is selected
    assert 1.0 < results[1]["events_per_frame"] <= 10.0


# --- a recording as the source (--journal) -------------------------------------------------------


@pytest.fixture(scope="module")
def bench_recording(tmp_path_factory) -> Path:
    """Simulator frames written by the journal's writer: 600 frames over 6 s, 12 symbols."""
    import trio

    from tests.test_replay import simulator_frames, write_journal

    directory = tmp_path_factory.mktemp("bench-recording")
    trio.run(write_journal, directory, simulator_frames(600))
    return directory


def test_journal_options_profile_the_recording_for_the_plan_and_the_offered_rate(bench_recording, tmp_path, capsys):
    from bench.runner import table, zipf_plan

    args = parse_arguments(["--journal", str(bench_recording), "--speed", "2"])
    profile = args.recording
    assert args.frame_events == "recorded" and set(profile.types) == {"T", "Q", "LULD", "FMV"}
    assert len(profile.symbols) == 12 and profile.symbols[0] == "AAPL"  # most traded first
    assert 250 < profile.events_per_second < 350  # 1,800 events over 5.99 s
    plan = zipf_plan(30, 1, profile.symbols, profile.types[:2])
    held = {channel.split(".", 1)[1] for client in plan for channel in client.split(",")}
    assert held <= {*profile.symbols, "*"}  # the recording's symbols, not the simulator's 3,000
    assert "max" in table([_result(rate_offered=None, frame_events="recorded")]).splitlines()[2]
    for argv, message in ((["--speed", "warp"], "--speed"), (["--sweep"], "--sweep"),
                          (["--framings", "1,10"], "--sweep and --framings")):
        with pytest.raises(SystemExit):
            parse_arguments(["--journal", str(bench_recording), *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_arguments(["--journal", str(tmp_path)])
    assert "holds no events" in capsys.readouterr().err


async def test_the_replay_source_counts_what_it_sent_between_the_marks_exactly(bench_recording):
    """What the runner's loss accounting rests on: a client's events between the two marks equal
    what the replay says it sent of that client's channels in the window."""
    import trio

    from bench.runner import expected_count
    from tests.helpers import POLYGON_KEY, authed_client
    from tests.test_replay import replay_config
    from proxy.sim.replay import run_replay

    channels = "T.*,LULD.AAPL,FMV.MSFT"  # the other client holds Q.*: the counts, summed over both, tell them apart
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(run_replay, replay_config(bench_recording, speed=4.0, loop=True))
        client = await authed_client(nursery, replay.port, POLYGON_KEY, subscribe=channels + ",BENCH.MARK")
        other = await authed_client(nursery, replay.port, POLYGON_KEY, subscribe="Q.*,BENCH.MARK")
        await client.more_events(50)
        replay.simulator.mark()
        await trio.sleep(2.0)  # more than a pass (1.5 s at 4x): the loop's restart is inside the window
        replay.simulator.mark()
        counted = dict(replay.simulator.window_counts)
        received = {}
        for name, who in (("client", client), ("other", other)):
            with trio.fail_after(30):
                while sum(1 for event in who.events if event["ev"] == "BENCH") < 2:
                    await who.receive()
            marks = [index for index, event in enumerate(who.events) if event["ev"] == "BENCH"]
            received[name] = marks[1] - marks[0] - 1
        nursery.cancel_scope.cancel()
    assert replay.passes >= 1
    assert received["client"] == expected_count(channels, counted) > 0
    assert received["other"] == expected_count("Q.*", counted) > 0
    assert replay.simulator.window_events == received["client"] + received["other"]


@pytest.mark.slow
def test_a_short_benchmark_on_a_recording_loses_nothing(bench_recording, tmp_path):
    """The whole harness with --journal: every process, the recording replayed in a loop at 2x,
    exact loss, the source and the offered rate in the JSON, latency left out."""
    import subprocess

    output = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, "-m", "bench.runner", "--journal", str(bench_recording), "--speed", "2",
         "--clients", "6", "--client-processes", "2", "--duration", "4", "--warmup", "1", "--json", str(output)],
        check=True, timeout=300, capture_output=True, cwd=Path(__file__).parent.parent,
    )
    (r,) = json.loads(output.read_text())["results"]
    assert r["lost_events"] == 0 and r["unexpected_events"] == 0 and r["clients_complete"] == 6
    assert r["received_events"] > 0 and r["frame_events"] == "recorded" and "journal" in r["source"]
    assert 500 < r["rate_offered"] < 700  # the recording's 300 events/s at 2x
    assert r["latency_ms"]["p99"] is None
def test_a_tiers_cpu_and_memory_include_its_worker_processes():
    """With FILTERED_PROXY_WORKERS the work is in the children: the benchmark counts them."""
    import subprocess

    from bench.runner import cpu_seconds, peak_rss_mb, process_tree

    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\n"
                               "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while (len(process_tree(parent.pid)) < 2 or cpu_seconds(parent.pid) < 0.5) and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        own = cpu_seconds(tree[0]) - cpu_seconds(tree[1])  # the parent's alone (it only sleeps)
        assert cpu_seconds(parent.pid) >= 0.5 > own
        assert peak_rss_mb(parent.pid) > peak_rss_mb(tree[1])
    finally:
        for pid in process_tree(parent.pid)[1:]:
            subprocess.run(["kill", "-9", str(pid)])
        parent.kill()
        parent.wait()


def test_the_source_process_replays_a_recording_and_answers_the_marks(bench_recording, tmp_path):
    """`python -m bench.sim_process --journal DIR`, as the runner starts it: its port, then after
    two marks the window's counts (none here: nobody connected) and how far behind it fell."""
    import os
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-m", "bench.sim_process", "--journal", str(bench_recording), "--speed", "max"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "REPLAY_PORT": "0"})
    try:
        assert json.loads(process.stdout.readline())["port"] > 0
        process.stdin.write(b"mark\nmark\n")
        process.stdin.flush()
        answer = json.loads(process.stdout.readline())
        assert answer["window_events"] == 0 and answer["counts"] == {} and "replay_behind_seconds" in answer
    finally:
        process.kill()
        process.communicate()
