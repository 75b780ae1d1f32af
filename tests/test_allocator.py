"""The allocator settings: every tier, and the journal writer, keep large buffers between uses;
the tier hands freed memory back; both are harmless where glibc's functions are missing."""

from __future__ import annotations

import logging
import resource
import threading

import trio

from proxy.core.journal import BlockCodec, frame_record
from proxy.net import allocator, journal_writer
from proxy.net.allocator import BLOCK_MMAP_THRESHOLD, BLOCK_TRIM_THRESHOLD, hold_freed_memory, return_free_memory
from proxy.net.journal_writer import JournalWriter


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[str, int, int | None]] = []
        self.answer = answer

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return self.answer

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, None))
        return 1


def test_the_block_settings_fix_both_thresholds():
    libc = FakeLibc()
    assert hold_freed_memory(libc)
    # M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD -1 (malloc.h): setting them also ends glibc's
    # "dynamic" thresholds, which moved with whatever the process happened to free
    assert sorted(libc.calls) == sorted([("mallopt", -3, BLOCK_MMAP_THRESHOLD), ("mallopt", -1, BLOCK_TRIM_THRESHOLD)])
    assert BLOCK_MMAP_THRESHOLD > journal_writer.BLOCK_BYTES * 3  # a block, its copy and its encodings


def test_a_refused_setting_is_a_warning_not_an_error(caplog):
    with caplog.at_level(logging.WARNING, "proxy.allocator"):
        assert not hold_freed_memory(FakeLibc(answer=0))
    assert "refused the buffer settings" in caplog.text


def test_without_glibc_nothing_is_done():
    assert not hold_freed_memory(None)
    return_free_memory(None)
    assert not hold_freed_memory(object())
    return_free_memory(object())


def test_freed_memory_is_handed_back_with_malloc_trim():
    libc = FakeLibc()
    return_free_memory(libc)
    assert libc.calls == [("malloc_trim", 0, None)]


async def test_the_disk_writer_holds_its_block_memory_when_it_starts(tmp_path, monkeypatch):
    held = []
    monkeypatch.setattr(journal_writer, "hold_freed_memory", lambda: held.append(True) or True)
    writer = JournalWriter(tmp_path, retention_seconds=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        assert held == [True]
        nursery.cancel_scope.cancel()


def test_on_glibc_encoding_blocks_in_a_thread_takes_no_new_pages_once_warm():
    # What the settings are for, on the real allocator: after a few blocks, a worker thread
    # encoding block after block reuses its buffers instead of faulting fresh pages in.
    if not allocator.hold_freed_memory():
        return  # not glibc: nothing to hold
    frame = "[" + ",".join('{"ev":"Q","sym":"S%d","bp":%d.25,"ap":%d.5,"t":%d}' % (i % 50, i, i, i)
                           for i in range(2_000)) + "]"  # about 100 KB
    codec, faults = BlockCodec(), []

    def encode_blocks() -> None:
        seq = 1
        for _ in range(30):
            records = []
            for _ in range(3):
                records.append(frame_record(seq, seq, frame[:-1] + " ]"))
                seq += 1
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            codec.encode(records)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    worker = threading.Thread(target=encode_blocks)
    worker.start()
    worker.join()
    assert sum(faults[10:]) < 20, faults


async def test_every_tier_holds_freed_memory_when_it_starts(nursery, monkeypatch):
    """Not only with a disk journal: a filtered tier's reads and frames churned its pages too."""
    from proxy.app import tier as tier_module
    from tests.helpers import start_firehose

    held = []
    monkeypatch.setattr(tier_module, "hold_freed_memory", lambda: held.append(True) or True)
    await start_firehose(nursery, connected=False)
    assert held == [True]
