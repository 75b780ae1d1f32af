"""A journal survives ``kill -9``: a real subprocess writes continuously through the real writer and
is killed at a random moment, several times over. Each time, before anything repairs the directory,
every segment reads clean but for, at most, an incomplete last block of the last one; everything a
write() had returned for is there, record for record; and the next start cuts the torn tail and
continues the seqs without a hole.

Half the rounds are killed at a random moment (a write() to the page cache is quick, so the kill
seldom lands inside one); in the other half the writer writes each block piecemeal and says when it
is inside one (see ``tests/clients/journal_crash_writer.py``), and is killed there, so that the torn
tail is met for real, not only in the byte-by-byte unit test."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxy.core.journal import RecordKind
from proxy.net.journal_store import list_segments, read_blocks, recover, scan_file
from tests.clients.journal_crash_writer import expected

ROOT = Path(__file__).parent.parent
ROUNDS = 4


def start_writer(directory: Path, piecemeal: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "clients" / "journal_crash_writer.py"),
                             str(directory), *(["--piecemeal"] if piecemeal else [])],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_until_killed(directory: Path, rng: random.Random, piecemeal: bool) -> tuple[int, int]:
    """Start the writer, let it write a while, SIGKILL it; returns (its first seq, the last seq a
    write() returned for before the kill)."""
    process = start_writer(directory, piecemeal)
    try:
        assert process.stdout is not None
        first = int(process.stdout.readline().split()[1])
        written = 0
        blocks = rng.randint(2, 6)
        while True:
            line = process.stdout.readline()
            assert line.startswith(("written ", "mid-block")), line
            if line.startswith("written "):
                written = int(line.split()[1])
                blocks -= 1
            if blocks <= 0 and (not piecemeal or line.startswith("mid-block")):
                break
        if not piecemeal:
            time.sleep(rng.uniform(0, 0.03))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        for line in process.stdout:  # what it reported between our last read and the kill
            if line.startswith("written "):
                written = max(written, int(line.split()[1]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return first, written


def check_as_the_crash_left_it(directory: Path, written: int) -> bool:
    """Everything before the last incomplete block is intact; returns whether there was one."""
    segments = list_segments(directory)
    torn = False
    for segment in segments:
        scan = scan_file(segment.path, decode=True)
        assert scan.clean, (segment.name, scan.damage)
        if scan.torn is not None:
            assert segment is segments[-1], f"{segment.name} is torn but not the last"
            torn = True
    verify = subprocess.run([sys.executable, "-m", "proxy.journal", "verify", str(directory)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert verify.returncode == 0, verify.stdout
    assert ("note: ends with" in verify.stdout) == torn
    seq = 1
    for block in read_blocks(directory):
        for record in block:
            assert record.seq == seq
            if record.kind is not RecordKind.GAP:  # (the writer paces itself to need none)
                kind, data = expected(seq)
                assert record.kind is kind
                assert (record.data if kind is RecordKind.FRAME else record.reason.encode()) == data, seq
            seq = record.end_seq + 1
    assert seq - 1 >= written, f"write() had returned for seq {written}, only {seq - 1} survived"
    return torn


def test_kill_9_while_writing_loses_nothing_written_and_leaves_at_most_a_torn_tail(tmp_path):
    rng = random.Random()
    torn_tails = 0
    survived = 0
    for round_ in range(ROUNDS):
        piecemeal = round_ % 2 == 1
        first, written = run_until_killed(tmp_path, rng, piecemeal)
        assert first == survived + 1, f"round {round_} continued at {first}, not after {survived}"
        torn = check_as_the_crash_left_it(tmp_path, written)
        # killed inside a block, with at least 15 ms of its pieces still to come: it must be torn
        assert torn or not piecemeal, f"round {round_}: killed inside a block, yet no torn tail"
        torn_tails += torn
        survived = max(record.end_seq for block in read_blocks(tmp_path) for record in block)
    recovered = recover(tmp_path)
    assert recovered.next_seq == survived + 1
    for segment in list_segments(tmp_path):
        scan = scan_file(segment.path, decode=True)
        assert scan.clean and scan.torn is None
    print(f"{ROUNDS} kills, {torn_tails} left a torn tail")
