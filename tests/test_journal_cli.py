"""``python -m proxy.journal`` on a recording made by a real run: the simulator, a firehose, and a
recorder holding ``*`` at the firehose that journals every frame it receives (as a filtered tier
receives them) through the real writer, with an upstream outage in the middle.

``cat --channels`` is compared with what a live client holding those channels received between
the simulator's two marks: a replay selects exactly what live routing sent."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

from proxy.app.journal_cli import Progress, main, parse_time
from proxy.core.journal import Journal
from proxy.core.protocol import parse_channel_list
from proxy.net.journal_store import list_segments, scan_file
from proxy.net.journal_writer import JournalWriter
from tests.conftest import FIREHOSE_KEY, authed_client, firehose_config, start_simulator, start_tier, wait_until

ROOT = Path(__file__).parent.parent
LIVE_CHANNELS = "T.AAPL,Q.MSFT,LULD.AAPL,BENCH.MARK"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.journal", *args], capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> dict:
    """Record a run once for the module's tests; returns the directory and what the test saw."""
    directory = tmp_path_factory.mktemp("journal")
    seen: dict = {"directory": directory}
    trio.run(record_a_run, directory, seen)
    return seen


async def record_a_run(directory: Path, seen: dict) -> None:
    frames: list[tuple[int, str]] = []
    statuses: list[tuple[int, str]] = []
    async with trio.open_nursery() as nursery:
        sim = await start_simulator(nursery, events_per_second=3000)
        firehose = await start_tier(nursery, firehose_config(
            sim, static_channels=parse_channel_list("T.*,Q.*,LULD.*,FMV.*,A.*")))
        writer = JournalWriter(directory, retention_seconds=None, block_seconds=0.05)
        recovered = await nursery.start(writer.run)
        journal = Journal(next_seq=recovered.next_seq, not_before_ns=recovered.last_ns, sink=writer.offer)
        recorder = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe="*")
        live = await authed_client(nursery, firehose.port, FIREHOSE_KEY, subscribe=LIVE_CHANNELS)
        await wait_until(lambda: "BENCH.MARK" in sim.subscribed_channels(), what="the firehose subscribed")

        async def record() -> None:
            while True:
                frame = await recorder.ws.get_message()
                received_ns = time.time_ns()
                journal.frame(frame, received_ns)
                frames.append((received_ns, frame))
                for event in json.loads(frame):
                    if event.get("status") == "upstream_disconnected":
                        statuses.append((journal.upstream_lost(event["message"], received_ns).seq, "lost"))
                    elif event.get("status") == "upstream_connected":
                        statuses.append((journal.upstream_restored(event["message"], received_ns).seq, "restored"))

        async def listen() -> None:
            while True:
                await live.receive()

        nursery.start_soon(record)
        nursery.start_soon(listen)
        await trio.sleep(0.3)
        sim.mark()
        await trio.sleep(0.6)
        sim.drop_all()
        await wait_until(lambda: sim.connections_total >= 2 and sim.connections, what="the reconnect")
        await wait_until(lambda: any(kind == "restored" for _, kind in statuses), what="the restore")
        await trio.sleep(0.6)
        sim.mark()
        await wait_until(lambda: sum(e.get("ev") == "BENCH" for e in live.events) == 2, what="the second mark")
        await wait_until(lambda: any('"sym":"MARK","n":2' in frame for _, frame in frames),
                         what="the recorder's second mark")
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    marks = [i for i, event in enumerate(live.events) if event.get("ev") == "BENCH"]
    seen.update(frames=frames, statuses=statuses, live_window=live.events[marks[0]:marks[1] + 1],
                stats=writer.stats, journal_next_seq=journal.next_seq)


def cat_lines(*args: str) -> list[dict]:
    result = run_cli("cat", *args)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_run_was_journaled_whole(recording):
    stats = recording["stats"]
    assert stats.records_dropped == 0 and stats.gaps == 0
    assert stats.last_written_seq == recording["journal_next_seq"] - 1
    assert len(recording["frames"]) > 100
    kinds = [kind for _, kind in recording["statuses"]]
    assert "lost" in kinds and "restored" in kinds


def test_verify_finds_the_recording_clean(recording):
    result = run_cli("verify", str(recording["directory"]))
    assert result.returncode == 0, result.stdout.decode()
    assert result.stdout.decode().splitlines()[-1].endswith(": clean")
    assert b"\r" not in result.stderr  # no progress bar on a pipe


def test_cat_into_a_reader_that_stops_ends_quietly_and_fine(recording):
    """`cat DIR | head -1`: the reader closing its end is its choice, not the journal's failure, so
    no traceback, and exit 0 (a script with pipefail goes on)."""
    process = subprocess.Popen([sys.executable, "-m", "proxy.journal", "cat", str(recording["directory"])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None and process.stderr is not None
    first = json.loads(process.stdout.readline())
    assert first["seq"] == 1
    process.stdout.close()  # as head does after its line; cat has far more than a pipe holds to write
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""


def test_ls_counts_frames_events_per_type_outages_and_gaps(recording):
    result = run_cli("ls", str(recording["directory"]))
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    total = text[text.index("total:"):]
    frames = recording["frames"]
    types: Counter[str] = Counter(event["ev"] for _, frame in frames for event in json.loads(frame))
    assert f"{len(frames):,} frames" in total
    assert f"{sum(types.values()):,} events" in total
    for ev, count in types.items():
        assert f"{ev} {count:,}" in total, ev
    statuses = Counter(kind for _, kind in recording["statuses"])
    assert f"upstream lost {statuses['lost']:,}, restored {statuses['restored']:,}" in total
    assert "0 gaps" in total
    last_seq = recording["journal_next_seq"] - 1
    assert f"seqs 1..{last_seq:,}" in total
    for segment in list_segments(recording["directory"]):
        assert segment.name in text


def test_cat_selects_what_a_live_client_of_those_channels_received(recording):
    lines = cat_lines(str(recording["directory"]), "--channels", LIVE_CHANNELS)
    events = [line["event"] for line in lines if "event" in line]
    marks = [i for i, event in enumerate(events) if event.get("ev") == "BENCH"]
    assert len(marks) == 2
    replayed = events[marks[0]:marks[1] + 1]
    live = recording["live_window"]
    assert len(live) > 50 and replayed == live
    assert {event["ev"] for event in replayed} >= {"T", "Q", "BENCH"}


def test_cat_prints_every_event_in_seq_order_with_the_outage_where_it_happened(recording):
    lines = cat_lines(str(recording["directory"]))
    frames = recording["frames"]
    expected = [event for _, frame in frames for event in json.loads(frame) if event.get("ev") != "status"]
    assert [line["event"] for line in lines if "event" in line] == expected
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs)
    markers = [(line["seq"], line["journal"]) for line in lines if "journal" in line]
    assert markers == [(seq, f"upstream_{kind}") for seq, kind in recording["statuses"]]
    # the outage sits between the events received before and after it
    lost = next(line for line in lines if line.get("journal") == "upstream_lost")
    assert "connection lost" in lost["reason"]
    for line in lines:
        assert line["received"].endswith("Z") and parse_time(line["received"], 0) // 1000 == line["received_ns"] // 1000


def test_cat_from_and_to_cut_by_receive_time(recording):
    frames = recording["frames"]
    start_ns = frames[len(frames) // 3][0]
    end_ns = frames[2 * len(frames) // 3][0]
    from_ms, to_ms = -(-start_ns // 1_000_000), end_ns // 1_000_000  # whole ms inside the range
    lines = cat_lines(str(recording["directory"]), "--from", str(from_ms), "--to", str(to_ms))
    times = [line["received_ns"] for line in lines]
    assert times and min(times) >= from_ms * 1_000_000 and max(times) < to_ms * 1_000_000
    expected = sum(1 for received_ns, frame in frames if from_ms * 1_000_000 <= received_ns < to_ms * 1_000_000
                   for event in json.loads(frame) if event.get("ev") != "status")
    assert sum("event" in line for line in lines) == expected
    iso = cat_lines(str(recording["directory"]), "--from", lines[0]["received"], "--to", lines[-1]["received"])
    assert iso[0] == lines[0] and iso[-1]["received_ns"] < lines[-1]["received_ns"]


def test_verify_reports_a_flipped_byte_precisely(recording, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(recording["directory"], copy, ignore=shutil.ignore_patterns("LOCK"))
    segment = list_segments(copy)[0]
    blocks = scan_file(segment.path, decode=True).blocks
    target = blocks[len(blocks) // 2]
    data = bytearray(segment.path.read_bytes())
    data[target.offset + 100] ^= 0x10
    segment.path.write_bytes(bytes(data))
    result = run_cli("verify", str(copy))
    text = result.stdout.decode()
    assert result.returncode == 1, text
    line = next(line for line in text.splitlines() if "DAMAGED bytes" in line)
    header = target.header
    assert f"bytes {target.offset:,}..{target.offset + header.size:,}" in line
    assert "payload checksum mismatch" in line
    assert f"seqs {header.first_seq:,}..{header.last_seq:,} lost" in line
    assert text.splitlines()[-1].endswith("1 problem found")
    # cat says so too, and prints everything else
    cat = run_cli("cat", str(copy))
    assert cat.returncode == 1 and b"payload checksum mismatch" in cat.stderr
    seqs = {json.loads(line)["seq"] for line in cat.stdout.splitlines()}
    assert not seqs & set(range(header.first_seq, header.last_seq + 1))


def test_verify_notes_a_torn_tail_on_the_last_segment_without_failing(recording, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(recording["directory"], copy, ignore=shutil.ignore_patterns("LOCK"))
    last = list_segments(copy)[-1]
    blocks = scan_file(last.path).blocks
    with open(last.path, "r+b") as file:
        file.truncate(blocks[-1].offset + 70)
    result = run_cli("verify", str(copy))
    assert result.returncode == 0, result.stdout.decode()
    assert "note: ends with an incomplete block" in result.stdout.decode()


def test_the_command_line_says_what_is_wrong(tmp_path):
    assert run_cli("verify", str(tmp_path / "missing")).returncode == 2
    empty = run_cli("verify", str(tmp_path))
    assert empty.returncode == 2 and b"no journal segments" in empty.stderr
    assert run_cli("ls", str(tmp_path)).returncode == 0  # an empty journal is not an error to list


def test_bad_times_and_channels_are_usage_errors(recording, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["cat", str(recording["directory"]), "--channels", "AAPL"])
    assert raised.value.code == 2 and "AAPL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["cat", str(recording["directory"]), "--from", "yesterday"])
    assert raised.value.code == 2 and "ISO 8601" in capsys.readouterr().err


def test_times_on_the_command_line():
    now = 1_800_000_000_000_000_000
    assert parse_time("1764065700123", now) == 1_764_065_700_123_000_000
    assert parse_time("-1500", now) == now - 1_500_000_000
    assert parse_time("2025-11-25T10:15:00.123456Z", now) == 1_764_065_700_123_456_000
    assert parse_time("2025-11-25T10:15:00", now) == 1_764_065_700_000_000_000
    assert parse_time("2025-11-25T11:15:00+01:00", now) == 1_764_065_700_000_000_000


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_drawn_on_a_terminal_only_and_erased():
    terminal = FakeTerminal()
    progress = Progress(1_000_000, "reading", terminal, delay=0, interval=0)
    progress.advance(500_000)
    assert "\rreading [###############               ]  50%" in terminal.getvalue()
    progress.close()
    assert terminal.getvalue().endswith("\r\x1b[K")
    pipe = io.StringIO()
    silent = Progress(1_000_000, "reading", pipe, delay=0, interval=0)
    silent.advance(500_000)
    silent.close()
    assert pipe.getvalue() == "" and silent.done == 500_000


def test_main_writes_json_lines_to_a_text_stream(recording):
    out, err = io.StringIO(), io.StringIO()
    assert main(["cat", str(recording["directory"]), "--channels", "T.AAPL"], stdout=out, stderr=err) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    events = [line["event"] for line in lines if "event" in line]
    assert events and all((event["ev"], event["sym"]) == ("T", "AAPL") for event in events)
