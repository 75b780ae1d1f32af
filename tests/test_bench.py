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
