"""A recorded journal served as a Polygon upstream: ``python -m proxy.replay JOURNAL_DIR``.

Clients connect, authenticate and subscribe exactly as they do at the simulator: this
is the simulator's server (:func:`~proxy.sim.simulator.run_simulator`, its protocol
handling, keys, connection limits and faults) with the recording as its source instead
of the synthetic market. Each connection gets, of every recorded frame, the events its
channels select (:class:`~proxy.core.journal.EventSelector`, which decides as live
routing does; ``*`` selects every data event), as the original event bytes, one frame out
for one recorded frame (never merged), in the recorded order. Statuses inside recorded
frames (the recorder's own subscribe answers, relayed notices) are not data and are not
replayed, as ``python -m proxy.journal cat`` does not print them.

Pacing (:mod:`proxy.sim.replay_schedule`): at the recorded pace, or ``speed`` times
faster, from the moment the first connection subscribes (so a firehose started after
the replay still gets the recording from its start); ``speed`` None is as fast as the
slowest connection's socket takes it. Recorded upstream outages keep their pause (no
frame was received then), and with ``outage_statuses`` they are also sent as the
``upstream_disconnected`` / ``upstream_connected`` statuses the tier's clients saw. Gaps
in the recording (records the recorder's disk could not take) are logged where they fall.

The journal is read from disk a block at a time in a worker thread
(:func:`~proxy.net.journal_store.read_blocks`), from ``from_ns`` on, up to ``to_ns``.
Damage found on the way (anything but a torn tail at the end of the last segment) stops
the replay with :class:`~proxy.core.errors.JournalDamaged` naming the segment and the
bytes, as ``verify`` would: a replay that quietly skipped part of a recording would be a
wrong test input.

For the benchmark, the simulator's marks and counting window work unchanged: events sent
in the window are counted by channel as the simulator counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import AsyncGenerator, Callable, Iterator

import attrs
import msgspec
import trio

from ..app.cli import run_module_main
from ..app.config import setup_logging
from ..app.journal_cli import describe_problem
from ..app.replay_config import REPLAY_OPTIONS, REPLAY_TIME_VARIABLES, load_replay_config
from ..app.tier import UPSTREAM_CONNECTED, UPSTREAM_DISCONNECTED
from ..core import protocol
from ..core.errors import ConfigError, FrameError, JournalDamaged, leaves
from ..core.journal import EventSelector, Record, RecordKind, TornTail, Damage, format_ns
from ..core.protocol import EventKey, event_symbol
from ..core.settings import ReplayConfig, variable_of
from ..net.journal_store import SegmentFile, list_segments, read_blocks
from .replay_schedule import MAX_SPEED_QUEUE_EVENTS, ReplaySchedule
from .simulator import SimConnection, Simulator, run_simulator

__all__ = ["PROG", "Blocks", "Replay", "disk_blocks", "replay_records", "run_replay", "build_parser", "main"]

log = logging.getLogger(__name__)
PROG = "python -m proxy.replay"
#: One pass over the recording: an async iterator of blocks of records, in seq order.
Blocks = Callable[[], AsyncGenerator[list[Record], None]]
#: While late (or at full speed), the feeder lets the connections' writers run this often.
_FRAMES_BETWEEN_CHECKPOINTS = 64
#: A replay this many seconds behind its schedule is logged (at most every 5 seconds).
_BEHIND_WARNING_SECONDS = 1.0
_read_keys = msgspec.json.Decoder(list[EventKey]).decode


@attrs.define(eq=False)
class Replay:
    """A running replay: the simulator it serves through, and what it has replayed (for
    tests, the log and the benchmark)."""

    config: ReplayConfig
    simulator: Simulator = attrs.field(init=False)
    #: Set when the first connection subscribed and the replay's clock started.
    started: trio.Event = attrs.field(factory=trio.Event)
    #: Set at the end of the recording (never, with ``loop``).
    finished: trio.Event = attrs.field(factory=trio.Event)
    passes: int = 0
    #: Recorded frames replayed (whether any connection selected an event of them or not).
    frames: int = 0
    #: Events handed to connections, over all of them.
    events_sent: int = 0
    #: Recorded frames that are not JSON arrays of objects (live routing drops them too).
    bad_frames: int = 0
    outages: int = 0
    gaps: int = 0
    #: The furthest behind its schedule the replay has been, in seconds.
    most_behind_seconds: float = 0.0
    _selectors: dict[SimConnection, tuple[int, EventSelector | None]] = attrs.field(factory=dict, init=False)
    _since_checkpoint: int = attrs.field(default=0, init=False)
    _warned_at: float = attrs.field(default=-1e9, init=False)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.simulator.port

    # --- what one record does -------------------------------------------------------------------

    def play(self, record: Record) -> None:
        """Hand one record to the connections now: a frame's selected events, an outage's
        status (with ``outage_statuses``), a gap's log line."""
        kind = record.kind
        if kind is RecordKind.FRAME:
            self._publish(record.data)
        elif kind is RecordKind.UPSTREAM_LOST:
            self.outages += 1
            log.info("replaying a recorded upstream outage (%s), received at %s", record.reason,
                     format_ns(record.received_ns))
            if self.config.outage_statuses:
                self._broadcast(protocol.status_frame(
                    UPSTREAM_DISCONNECTED, f"recorded upstream connection lost ({record.reason})"))
        elif kind is RecordKind.UPSTREAM_RESTORED:
            log.info("replaying the end of a recorded outage (%s)", record.reason)
            if self.config.outage_statuses:
                self._broadcast(protocol.status_frame(UPSTREAM_CONNECTED, f"recorded: {record.reason}"))
        else:
            self.gaps += 1
            log.warning("the recording has a gap here: seqs %d..%d are not in it (%s)", record.seq,
                        record.end_seq, record.reason)

    def _publish(self, frame: str | bytes) -> None:
        self.frames += 1
        simulator = self.simulator
        for connection in simulator.connections:
            selector = self._selector(connection)
            if selector is None:
                continue
            try:
                selected = selector.select(frame)
            except FrameError as error:
                self.bad_frames += 1
                log.warning("skipped a recorded frame that is not a JSON array of objects (%s): %.80r",
                            error, frame)
                return  # the same for every connection
            if not selected:
                continue
            if selector.everything and _statusless(frame):
                payload = frame if isinstance(frame, bytes) else frame.encode()  # every event: the frame as recorded
            else:
                payload = b"[" + b",".join(selected) + b"]"
            count = len(selected)
            self.events_sent += count
            simulator.events_generated += count
            if simulator.counting:
                simulator.window_events += count
                simulator.window_counts.update(_channels_of(payload))
            connection.enqueue(count, payload)

    def _broadcast(self, status: str) -> None:
        payload = status.encode()
        for connection in self.simulator.connections:
            if connection.channels:
                connection.enqueue(0, payload)

    def _selector(self, connection: SimConnection) -> EventSelector | None:
        """The connection's selector, rebuilt only when its channels changed."""
        cached = self._selectors.get(connection)
        if cached is not None and cached[0] == connection.revision:
            return cached[1]
        selector = EventSelector(connection.channels) if connection.channels else None
        self._selectors[connection] = (connection.revision, selector)
        if len(self._selectors) > 2 * len(self.simulator.connections) + 16:
            live = self.simulator.connections
            self._selectors = {key: value for key, value in self._selectors.items() if key in live}
        return selector

    # --- pacing ----------------------------------------------------------------------------------

    async def wait_turn(self, schedule: ReplaySchedule, record: Record) -> None:
        """Return when ``record`` is due; at full speed, when no connection has too much queued.
        While late, let the connections' writers run every few frames."""
        due = schedule.due(record.received_ns)
        now = trio.current_time()
        if due > now:
            self._since_checkpoint = 0
            await trio.sleep_until(due)
        else:
            self._note_behind(now - due, now)
            self._since_checkpoint += 1
            if self._since_checkpoint >= _FRAMES_BETWEEN_CHECKPOINTS:
                self._since_checkpoint = 0
                await trio.lowlevel.checkpoint()
        if schedule.speed is None:
            while any(c.pending_events > MAX_SPEED_QUEUE_EVENTS for c in self.simulator.connections):
                await trio.sleep(0.002)

    def _note_behind(self, behind: float, now: float) -> None:
        if self.config.speed is None:
            return
        self.most_behind_seconds = max(self.most_behind_seconds, behind)
        if behind >= _BEHIND_WARNING_SECONDS and now - self._warned_at >= 5.0:
            self._warned_at = now
            log.warning("the replay is %.1fs behind the recorded pace at speed %g: this machine cannot "
                        "keep it (nothing is skipped; late frames go out as soon as they can)", behind,
                        self.config.speed)


def _statusless(frame: str | bytes) -> bool:
    """True when no event of ``frame`` can be a status (no ``"status"`` in it, nor a ``\\u``
    escape that could spell it): then ``*`` selects all of its events, and the frame goes out whole."""
    if isinstance(frame, str):
        return '"status"' not in frame and "\\u" not in frame
    return b'"status"' not in frame and b"\\u" not in frame


def _channels_of(payload: bytes) -> Iterator[str]:
    """Each event's channel (``T.AAPL``), as the simulator counts what it sent."""
    for key in _read_keys(payload):
        yield f"{key.ev}.{event_symbol(key)}"


async def _first_subscriber(simulator: Simulator) -> None:
    while not any(connection.channels for connection in simulator.connections):
        await trio.sleep(0.01)


async def replay_records(replay: Replay, blocks: Blocks) -> None:
    """Feed the recording to the simulator's connections: wait for the first subscriber, then
    one pass over ``blocks()`` (again and again with ``loop``), each record when it is due,
    up to ``to_ns``; then set ``finished`` and serve no more data (connections stay open)."""
    config = replay.config
    await _first_subscriber(replay.simulator)
    replay.started.set()
    log.info("a client subscribed: replay started (speed %s)", "max" if config.speed is None else f"{config.speed:g}")
    while True:
        began, frames, events = trio.current_time(), replay.frames, replay.events_sent
        schedule = ReplaySchedule(start=began, speed=config.speed)
        async with contextlib.aclosing(blocks()) as stream:
            async for block in stream:
                if not await _play_block(replay, schedule, block):
                    break
        replay.passes += 1
        log.info("replayed the recording%s: %d frames, %d events sent, in %.1fs%s",
                 f" (pass {replay.passes})" if config.loop else "", replay.frames - frames,
                 replay.events_sent - events,
                 trio.current_time() - began, "; again from its start" if config.loop else
                 "; no more data (connections stay open)")
        if not config.loop:
            break
    replay.finished.set()


async def _play_block(replay: Replay, schedule: ReplaySchedule, block: list[Record]) -> bool:
    """Play a block's records in turn; False once ``to_ns`` is reached."""
    to_ns = replay.config.to_ns
    for record in block:
        if to_ns is not None and record.received_ns >= to_ns:
            return False
        await replay.wait_turn(schedule, record)
        replay.play(record)
    return True


# --- the journal on disk ------------------------------------------------------------------------------


def _segments(directory: str) -> list[SegmentFile]:
    """The journal's segments; ConfigError when there is no readable journal there."""
    try:
        segments = list_segments(directory)
    except OSError as error:
        raise ConfigError("JOURNAL_DIR", f"cannot read {directory}: {error.strerror or error}") from None
    if not segments:
        raise ConfigError("JOURNAL_DIR", f"no journal segments in {directory} (a journal is the "
                                         f"JOURNAL_DIR of a tier, or a recording made with it)")
    return segments


def _damage_reporter(directory: str, segments: list[SegmentFile]) -> Callable[[str, Damage | TornTail], None]:
    last = segments[-1].name

    def on_problem(name: str, problem: Damage | TornTail) -> None:
        if isinstance(problem, TornTail) and name == last:
            return  # what a writer at work, or a crash, leaves: nothing is missing before it
        raise JournalDamaged(f"{Path(directory) / name}: {describe_problem(problem, last=name == last)} "
                             f"(python -m proxy.journal verify {directory} reports every problem)")

    return on_problem


def _close(blocks: Iterator[list[Record]]) -> None:
    """Close a reading generator now, so that its segment's map is released now."""
    close = getattr(blocks, "close", None)
    if close is not None:
        close()


def _next_block(blocks: Iterator[list[Record]]) -> list[Record] | None:
    return next(blocks, None)


async def disk_blocks(directory: str, from_ns: int | None = None) -> AsyncGenerator[list[Record], None]:
    """One pass over the journal in ``directory`` from ``from_ns`` on: its blocks of records,
    each read and decompressed in a worker thread. Raises :class:`JournalDamaged` at damage,
    ConfigError when the directory holds no journal."""
    segments = await trio.to_thread.run_sync(_segments, directory)
    blocks = read_blocks(directory, from_ns=from_ns, segments=segments,
                         on_problem=_damage_reporter(directory, segments))
    try:
        while (block := await trio.to_thread.run_sync(_next_block, blocks)) is not None:
            if block:
                yield block
    finally:
        _close(blocks)


def _first_record(directory: str, from_ns: int | None) -> tuple[list[SegmentFile], Record | None]:
    segments = _segments(directory)
    blocks = read_blocks(directory, from_ns=from_ns, segments=segments,
                         on_problem=_damage_reporter(directory, segments))
    try:
        for block in blocks:
            if block:
                return segments, block[0]
        return segments, None
    finally:
        _close(blocks)


async def run_replay(
    config: ReplayConfig, *, blocks: Blocks | None = None,
    task_status: trio.TaskStatus[Replay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config.journal_dir`` as a Polygon upstream until cancelled; hands the running
    :class:`Replay` to ``task_status`` once it listens. ``blocks`` replaces the journal on
    disk as the source of records (tests).

    Raises ConfigError when there is no journal, nothing in the ``from``/``to`` range, or
    the port cannot be opened; :class:`JournalDamaged` when damage is reached.
    """
    directory = config.journal_dir
    if blocks is None:
        segments, first = await trio.to_thread.run_sync(_first_record, directory, config.from_ns)
        if first is None or (config.to_ns is not None and first.received_ns >= config.to_ns):
            window = " ".join(part for part in (
                f"from {format_ns(config.from_ns)}" if config.from_ns is not None else "",
                f"before {format_ns(config.to_ns)}" if config.to_ns is not None else "") if part)
            raise ConfigError("REPLAY_FROM / REPLAY_TO", f"{directory} holds nothing received {window or 'at all'} "
                                                         f"(it begins at {format_ns(segments[0].start_ns)}; "
                                                         f"python -m proxy.journal ls {directory} shows its range)")
        blocks = functools.partial(disk_blocks, directory, config.from_ns)
        begins = first.received_ns
    else:
        begins = None
    replay = Replay(config)
    source = blocks

    async def feed(simulator: Simulator) -> None:
        replay.simulator = simulator
        await replay_records(replay, source)

    async with trio.open_nursery() as nursery:
        replay.simulator = await nursery.start(functools.partial(
            run_simulator, config.server(), source=feed, port_setting="REPLAY_PORT"))
        speed = "max" if config.speed is None else f"{config.speed:g}x"
        log.info("replaying %s%s on ws://%s:%d/stocks at speed %s%s%s; it starts when a client subscribes",
                 directory, f" from {format_ns(begins)}" if begins is not None else "", config.host,
                 replay.port, speed, f" until {format_ns(config.to_ns)}" if config.to_ns is not None else "",
                 ", looping" if config.loop else "")
        task_status.started(replay)


# --- the command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m proxy.replay``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a recorded journal (a tier's JOURNAL_DIR) as a Polygon upstream: clients authenticate "
                    "and subscribe as at Polygon, and get the recorded events of their channels in the original "
                    "framing, at the recorded pace (or --speed). Every option can also be set with its REPLAY_* "
                    "variable (in the environment or .env); the option wins.")
    parser.add_argument("directory", help="the journal directory")

    fields = attrs.fields_dict(ReplayConfig)

    def option(name: str, **kwargs: object) -> None:
        flag = REPLAY_OPTIONS[name]
        if name in REPLAY_TIME_VARIABLES:
            variable, default = REPLAY_TIME_VARIABLES[name], ""
        else:
            declared = variable_of(fields[name])
            assert declared is not None and isinstance(declared.name, str)
            variable, default = declared.name, _default_text(fields[name].default)
        help_text = str(kwargs.pop("help"))
        parser.add_argument(flag, dest=name, help=f"{help_text} ({variable}, default {default or 'none'})",
                            **kwargs)  # type: ignore[arg-type]

    option("host", metavar="HOST", help="address to listen on")
    option("port", metavar="PORT", help="port to listen on; 0: any free port, printed on standard output")
    option("api_keys", metavar="KEYS", help="comma-separated keys it accepts (empty: any)")
    option("max_connections", metavar="N", help="connections per key, then max_connections")
    option("allow_star", action="store_const", const="true", help="accept the bare * channel")
    option("speed", metavar="N|max", help="N times the recorded pace; max: as fast as the sockets take")
    option("from", metavar="TIME", help="replay what was received at or after TIME: ISO 8601 (UTC unless "
                                        "a zone is given), ms since the epoch, or negative ms before now")
    option("to", metavar="TIME", help="replay what was received before TIME (same forms)")
    option("loop", action="store_const", const="true", help="start again at the end of the recording")
    option("outage_statuses", action="store_const", const="true",
           help="send recorded outages as upstream_disconnected / upstream_connected statuses")
    return parser


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, frozenset):
        return ""
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """Run the replay until Ctrl-C or SIGTERM; the exit code (0, 1 damage reached, 2 usage or configuration)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in REPLAY_OPTIONS}
    try:
        config = load_replay_config(args.directory, options)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.library_log_level)
    outcome = {"code": 0}
    code = run_module_main(functools.partial(_serve, config, outcome))
    return code or outcome["code"]


async def _serve(config: ReplayConfig, outcome: dict[str, int]) -> None:
    try:
        async with trio.open_nursery() as nursery:
            replay = await nursery.start(run_replay, config)
            if config.port == 0:
                print(replay.port, flush=True)
    except* JournalDamaged as group:
        for error in leaves(group):
            log.error("stopped: the journal is damaged: %s", error)
        outcome["code"] = 1
