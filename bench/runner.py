"""``scripts/bench``: measure the tiers as separate processes on 127.0.0.1.

Scenarios:
  filtered       simulator → firehose → filtered proxy → N clients (default 100): most
                 subscribe 5-50 symbols over T and Q, drawn Zipf-weighted; 5 % take T.*.
  firehose-star  simulator → firehose → 4 clients holding `*` (every frame relayed).
  idle           simulator → firehose → filtered proxy → N mostly idle clients (default 1000):
                 each holds one rarely traded symbol; for the filtered tier's memory.

Framing: the tiers' cost is per upstream frame, so how many events the simulator puts
in a frame matters as much as the rate. --frame-events sets it for the simulator
(SIMULATOR_FRAME_EVENTS): N events a frame, frames evenly paced (rate / N a second);
"adaptive", as Polygon sends (each event its own frame, batched only while the
firehose's socket is backed up); or "tick" (the default, as before this option: a
10 ms tick's events a frame, rate / 100 up to 200, so 200 at 20,000/s). --framings
1,10,200 runs the scenario once per framing and prints one table. "ev/frame" is what
the firehose really got: events over data frames the simulator wrote in the window.

Each run: warm up, send a mark through the stream, run for the duration, send a second
mark. Clients count what they received between the marks; the simulator says what it sent,
by channel, so each client's expected count is exact. CPU seconds and peak RSS per tier
come from /proc (the OS's accounting of each process), and so does what the rest of the
machine used meanwhile ("other processes"): on a shared machine that is CPU the tiers did
not have, and a warning says so when it is over a fifth of a core. "join" is how long a new client
waits from connecting to its first event, probed five times while the load runs, from a
process of its own.

A recording as the source: --journal DIR replays a journal directory (a tier's JOURNAL_DIR,
or one made with `python -m bench.recording record`) in a loop, in its original framing, at
its recorded pace or --speed N (N times faster; max: as fast as the firehose takes it),
instead of the simulator's synthetic data; --rate, --frame-events, --framings, --prebuilt
and --sweep do not apply. Loss is counted exactly as with the simulator (the replay counts
what it sent between the marks, by channel). The clients' channels are drawn from the
recording's own symbols (most traded first) and its two most frequent event types;
"offered/s" is the recording's rate times the speed. Latency is not measured: replayed
events carry their recorded timestamps.

The clients are split over --client-processes processes (round-robin over the plan), so
that the harness is not what limits a run; each process's CPU (% of one core) is in
every run's output, with a warning when one is near a whole core.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from proxy.app.config import parse_frame_events
from proxy.app.replay_config import parse_speed
from proxy.core.settings import FRAME_TICK
from proxy.sim.market import synthetic_symbols

PYTHON = sys.executable
TRIO_RUN = str(Path(sys.executable).parent / "trio-run")
TICKS = os.sysconf("SC_CLK_TCK")
SYMBOLS = 3000
POLYGON_KEY, FIREHOSE_KEY, CLIENT_KEY = "bench-polygon", "bench-firehose", "bench-client"
#: A client process above this share of one core may be what limits the run, not the tiers.
SATURATED_PERCENT = 90
#: Other processes using more than this share of one core during the window are named in a warning.
OTHERS_PERCENT = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _parents() -> dict[int, int]:
    """Every running process's parent, read once from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])  # field 4 of stat: the parent's pid
            except (FileNotFoundError, ProcessLookupError):
                pass  # gone meanwhile
    return parents


def process_tree(pid: int, parents: dict[int, int] | None = None) -> list[int]:
    """``pid`` and its children (a filtered proxy with FILTERED_PROXY_WORKERS: the parent and its workers)."""
    parents = _parents() if parents is None else parents
    return [pid, *(child for child, parent in parents.items() if parent == pid)]


def cpu_seconds(pid: int, parents: dict[int, int] | None = None) -> float:
    """CPU (user + system) used by ``pid`` and its children still running."""
    total = 0
    for member in process_tree(pid, parents):
        try:
            fields = _stat(member)
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def cpu_by_name(pids: dict[str, int]) -> dict[str, float]:
    """:func:`cpu_seconds` of each named process, /proc's process list read once for all of them
    (once a second during a run: the harness's own reads count against the machine)."""
    parents = _parents()
    return {name: cpu_seconds(pid, parents) for name, pid in pids.items()}


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used since boot, every core together."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS  # user .. steal; guest time is already inside user


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of ``pid`` and its children, added up."""
    total = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024 if total else float("nan")


def zipf_plan(clients: int, seed: int, symbols: tuple[str, ...] | None = None,
              kinds: tuple[str, ...] = ("T", "Q")) -> list[str]:
    """Each client's channels: 5 % hold ``kinds[0]``.*, the others 5-50 symbols drawn Zipf-weighted
    (``symbols`` most traded first; the simulator's by default) of every kind."""
    symbols = symbols or synthetic_symbols(SYMBOLS)
    weights = [1 / rank ** 1.1 for rank in range(1, len(symbols) + 1)]
    rnd = random.Random(seed)
    plan = []
    for _ in range(clients):
        if rnd.random() < 0.05:
            plan.append(f"{kinds[0]}.*")
            continue
        chosen: set[str] = set()
        wanted = rnd.randint(5, 50)
        wanted = min(wanted, len(symbols))
        while len(chosen) < wanted:
            chosen.update(rnd.choices(symbols, weights=weights, k=wanted - len(chosen)))
        plan.append(",".join(f"{kind}.{symbol}" for symbol in sorted(chosen) for kind in kinds))
    return plan


def idle_plan(clients: int, symbols: tuple[str, ...] | None = None, kind: str = "T") -> list[str]:
    tail = (symbols or synthetic_symbols(SYMBOLS))[-clients:]
    return [f"{kind}.{symbol}" for symbol in tail]


def split_plan(plan: list[str], processes: int) -> list[list[str]]:
    """The plan over ``processes`` client processes, round-robin, so the few ``T.*`` clients spread."""
    count = max(1, min(processes, len(plan)))
    return [plan[index::count] for index in range(count)]


def merged_latency(histograms: list[dict[str, int]]) -> dict[str, Any]:
    """p50, p99 and max (ms, to 0.1 ms) over every sample of several client processes' histograms."""
    counts: collections.Counter[int] = collections.Counter()
    for histogram in histograms:
        for bucket, count in histogram.items():
            counts[int(bucket)] += count
    total = sum(counts.values())
    if not total:
        return {"p50": None, "p99": None, "max": None, "samples": 0}
    ordered = sorted(counts.items())

    def at(fraction: float) -> float:  # the sample at index int(fraction * total), as percentile() picks
        index, seen = min(total - 1, int(fraction * total)), 0
        for bucket, count in ordered:
            seen += count
            if seen > index:
                return bucket / 10
        raise AssertionError("unreachable")

    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1][0] / 10, "samples": total}


def expected_count(channels: str, counts: dict[str, int]) -> int:
    total = 0
    for channel in channels.split(","):
        if channel == "*":
            return sum(counts.values())
        if channel.endswith(".*"):
            prefix = channel[:-1]
            total += sum(n for name, n in counts.items() if name.startswith(prefix))
        else:
            total += counts.get(channel, 0)
    return total


class Processes:
    """The processes of one run, stopped with SIGTERM (then killed) whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(command, env={**os.environ, **env}, stderr=log, **kwargs)
        self.running[name] = process
        return process

    def wait_for_log(self, name: str, text: str, timeout: float = 60, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        path = self.logs / f"{name}.log"
        while time.monotonic() < deadline:
            if path.read_text().count(text) >= count:
                return
            if self.running[name].poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not report {text!r}; its log:\n{path.read_text()[-3000:]}")

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def read_json_line(stream: IO[bytes], timeout: float, what: str) -> dict:
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    if not selector.select(timeout):
        raise RuntimeError(f"no answer from {what} within {timeout:.0f}s")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} ended without an answer")
    return json.loads(line)


def collect_answers(processes: dict[str, subprocess.Popen], wait: float) -> tuple[dict[str, dict], list[str]]:
    """Each process's JSON answer. Those that have not answered within ``wait`` seconds (their
    clients have not yet seen the closing mark: the tiers are that far behind) are told to stop
    with SIGUSR1 and answer with what they have; their names come back as the second value."""
    import selectors

    answers: dict[str, dict] = {}
    selector = selectors.DefaultSelector()
    for name, process in processes.items():
        selector.register(process.stdout, selectors.EVENT_READ, name)
    deadline = time.monotonic() + wait
    while len(answers) < len(processes) and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            name = key.data
            selector.unregister(key.fileobj)
            line = processes[name].stdout.readline()
            if not line:
                raise RuntimeError(f"{name} ended without an answer")
            answers[name] = json.loads(line)
    stopped = [name for name in processes if name not in answers]
    for name in stopped:
        processes[name].send_signal(signal.SIGUSR1)
    for name in stopped:
        answers[name] = read_json_line(processes[name].stdout, 60, f"the stopped process {name}")
    return answers, stopped


def count_in_log(path: Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


def run_once(args: argparse.Namespace, rate: float, frame_events: int | str) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    processes = Processes(logs)
    scenario = args.scenario
    firehose_port, filtered_port = free_port(), free_port()
    shared = {"PROXY_ENV_FILE": str(logs / "empty.env"), "LOG_LEVEL": "warning",
              "MAX_CONNECTIONS_PER_IP": "1000000", "MAX_CLIENTS": "1000000",  # every bench client is 127.0.0.1
              "CLIENT_QUEUE_EVENTS": str(args.queue_events)}
    (logs / "empty.env").write_text("")
    recording = args.recording  # the journal's profile, when the source is a recording
    try:
        if recording is None:
            simulator = processes.start("simulator", [PYTHON, "-m", "bench.sim_process"], {
                **shared, "LOG_LEVEL": "info", "SIMULATOR_PORT": "0", "SIMULATOR_SYMBOLS": str(SYMBOLS),
                "SIMULATOR_EVENTS_PER_SECOND": str(rate), "SIMULATOR_SEED": "1",
                "SIMULATOR_API_KEYS": POLYGON_KEY, "SIMULATOR_PREBUILT_EVENTS": str(args.prebuilt),
                "SIMULATOR_FRAME_EVENTS": str(frame_events),
            }, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            static = "T.*,Q.*,LULD.*,FMV.*" if scenario == "firehose-star" else ""
        else:
            simulator = processes.start("simulator", [
                PYTHON, "-m", "bench.sim_process", "--journal", str(args.journal), "--speed", args.speed,
            ], {**shared, "LOG_LEVEL": "info", "REPLAY_PORT": "0", "REPLAY_API_KEYS": POLYGON_KEY},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            static = ",".join(f"{kind}.*" for kind in recording.types) if scenario == "firehose-star" else ""
        simulator_port = read_json_line(simulator.stdout, 120, "the simulator")["port"]
        processes.start("firehose", [TRIO_RUN, "proxy.firehose"], {
            **_profile_env(args, "firehose", logs), **_journal_env(args, "firehose"),
            **shared, "LOG_LEVEL": "info", "POLYGON_API_KEY": POLYGON_KEY,
            "POLYGON_URL": f"ws://127.0.0.1:{simulator_port}/stocks", "FIREHOSE_HOST": "127.0.0.1",
            "FIREHOSE_PORT": str(firehose_port), "FIREHOSE_API_KEYS": FIREHOSE_KEY,
            "FIREHOSE_METRICS_PORT": "0", "FIREHOSE_SUBSCRIPTIONS": static,
        })
        processes.wait_for_log("firehose", "Authenticated successfully")
        tiers = {"firehose": processes.running["firehose"].pid}
        if scenario == "firehose-star":
            url, key, plan = f"ws://127.0.0.1:{firehose_port}/stocks", FIREHOSE_KEY, ["*"] * 4
        else:
            processes.start("filtered", [TRIO_RUN, "proxy.filtered"], {
                **_profile_env(args, "filtered", logs), **_journal_env(args, "filtered"),
                **shared, "LOG_LEVEL": "info", "FIREHOSE_URL": f"ws://127.0.0.1:{firehose_port}",
                "POLYGON_API_KEY": FIREHOSE_KEY, "FILTERED_PROXY_HOST": "127.0.0.1",
                "FILTERED_PROXY_PORT": str(filtered_port), "FILTERED_PROXY_API_KEYS": CLIENT_KEY,
                "FILTERED_METRICS_PORT": "0", "FILTERED_PROXY_WORKERS": str(args.workers),
            })
            processes.wait_for_log("filtered", "Subscribed to wildcard", count=args.workers)
            tiers["filtered"] = processes.running["filtered"].pid
            url, key = f"ws://127.0.0.1:{filtered_port}/stocks", CLIENT_KEY
            if recording is None:
                plan = idle_plan(args.clients) if scenario == "idle" else zipf_plan(args.clients, args.seed)
            else:
                kinds = recording.types[:2]
                plan = (idle_plan(args.clients, recording.symbols, kinds[0]) if scenario == "idle"
                        else zipf_plan(args.clients, args.seed, recording.symbols, kinds))
        no_plan = logs / "no-plan.json"
        no_plan.write_text("[]")
        client_command = [PYTHON, "-m", "bench.client_process", "--url", url, "--key", key,
                          "--timeout", str(args.duration + args.warmup + 300)]
        clients: dict[str, subprocess.Popen] = {}
        for index, chunk in enumerate(split_plan(plan, args.client_processes), 1):
            plan_file = logs / f"plan-{index}.json"
            plan_file.write_text(json.dumps(chunk))
            clients[f"clients-{index}"] = processes.start(
                f"clients-{index}", [*client_command, "--plan", str(plan_file), "--join-probes", "0"],
                {}, stdout=subprocess.PIPE)
        ready = sum(read_json_line(process.stdout, 300, f"the client process {name}")["ready"]
                    for name, process in clients.items())
        # The join probes run in a process of their own: in the clients' process they would wait
        # behind 100 busy clients' event loop, and measure that instead of the proxy.
        joiner = processes.start("joiner", [
            *client_command, "--plan", str(no_plan), "--join-probes", "5",
            "--join-delay", str(args.warmup + min(1.0, args.duration / 4)),
        ], {}, stdout=subprocess.PIPE)
        read_json_line(joiner.stdout, 60, "the join probe")
        source = f"{rate:,.0f} ev/s" if recording is None else f"{args.journal} at speed {args.speed}"
        _progress(f"{scenario} @ {source}, frames of {frame_events}: {ready}/{len(plan)} clients "
                  f"subscribed in {len(clients)} process(es); warming up")
        time.sleep(args.warmup)

        harness = {"simulator": simulator.pid, **{name: process.pid for name, process in clients.items()},
                   "joiner": joiner.pid}
        before = cpu_by_name({**tiers, **harness})
        machine_before = machine_busy_seconds()
        started = time.monotonic()
        simulator.stdin.write(b"mark\n")
        simulator.stdin.flush()
        while (elapsed := time.monotonic() - started) < args.duration:
            time.sleep(min(1.0, args.duration - elapsed))
            used = {name: seconds - before[name] for name, seconds in cpu_by_name({**tiers, **harness}).items()}
            elapsed = time.monotonic() - started
            _progress(f"  {elapsed:5.1f}s  " + "  ".join(
                f"{name} CPU {100 * seconds / elapsed:5.1f}%" for name, seconds in used.items()))
        simulator.stdin.write(b"mark\n")
        simulator.stdin.flush()
        window = time.monotonic() - started
        after = cpu_by_name({**tiers, **harness})
        machine_used = machine_busy_seconds() - machine_before
        sent = read_json_line(simulator.stdout, 30, "the simulator")
        by_name, stopped = collect_answers({**clients, "joiner": joiner}, args.drain_seconds)
        answers = [by_name[name] for name in clients]
        joins = by_name["joiner"]["join_seconds"]
        rss = {name: peak_rss_mb(pid) for name, pid in tiers.items()}
    finally:
        processes.stop()
    # Lost links are part of the result: what was sent while a link was down never arrives.
    link_drops = {name: count_in_log(logs / f"{name}.log", "link down") for name in tiers}
    simulator_drops = count_in_log(logs / "simulator.log", "is a slow consumer")

    counts = sent["counts"]
    channels = [item for answer in answers for item in answer["channels"]]
    received = [count for answer in answers for count in answer["received"]]
    expected = [expected_count(item, counts) for item in channels]
    lost = sum(max(0, e - r) for e, r in zip(expected, received))
    extra = sum(max(0, r - e) for e, r in zip(expected, received))
    events_in = sent["window_events"]
    cpu_percent = {name: round(100 * (after[name] - before[name]) / window, 1) for name in after}
    result = {
        "scenario": scenario, "clients": len(plan), "rate_offered": rate,
        "frame_events": str(frame_events),
        # what the firehose really got, counted as written: a connection gets only the events its
        # channels select, and a writer behind its queue must not skew the ratio
        "events_per_frame": round(sent["window_frame_events"] / max(sent["window_frames"], 1), 1),
        "frames_into_firehose_per_s": round(sent["window_frames"] / window),
        "simulator_events_skipped": sent["events_skipped"],
        "duration_s": round(window, 2),
        "generated_per_s": round(sent["events_generated"] / max(window, 1e-9)),  # whole run, approx
        "into_firehose_per_s": round(events_in / window),
        "delivered_per_s": round(sum(received) / window),
        "expected_events": sum(expected), "received_events": sum(received),
        "lost_events": lost, "unexpected_events": extra,
        "clients_complete": sum(answer["saw_both_marks"] for answer in answers),
        # processes stopped after --drain-seconds without every client seeing the closing mark
        "client_processes_stopped": [name for name in stopped if name != "joiner"],
        "upstream_link_drops": link_drops,
        "simulator_slow_consumer_drops": simulator_drops,
        "client_failures": [failure for answer in answers for failure in answer["failures"]],
        "latency_ms": merged_latency([answer["latency_histogram"] for answer in answers]),
        "join_ms": [round(seconds * 1000, 1) for seconds in joins],
        "cpu_us_per_input_event": {
            name: round(1e6 * (after[name] - before[name]) / max(events_in, 1), 2) for name in tiers},
        "cpu_percent": cpu_percent,
        "client_processes": len(clients),
        "client_cpu_percent": [cpu_percent[name] for name in clients],
        # The machine is shared: what every process used in the window (% of one core, all cores
        # together), and what was not this benchmark's. Much of the latter makes every figure worse.
        "machine_cpu_percent": round(100 * machine_used / window, 1),
        "other_cpu_percent": round(max(0.0, 100 * machine_used / window - sum(cpu_percent.values())), 1),
        "peak_rss_mb": {name: round(value, 1) for name, value in rss.items()},
        "logs": str(logs),
    }
    if recording is not None:
        speed = parse_speed(args.speed)
        result.update({
            "source": f"journal {args.journal} at speed {args.speed}", "frame_events": "recorded",
            # what the recording offers at this speed (None: as fast as the firehose takes it)
            "rate_offered": None if speed is None else round(recording.events_per_second * speed),
            # replayed events carry their recorded timestamps: a latency from them means nothing
            "latency_ms": {"p50": None, "p99": None, "max": None, "samples": 0},
            "replay_behind_seconds": sent.get("replay_behind_seconds"),
        })
    return result


def _journal_env(args: argparse.Namespace, tier: str) -> dict[str, str]:
    """``--tier-journal``: off (no journal), memory (the default ring), disk (the ring and a fresh
    temporary directory per tier, deleted when the benchmark exits)."""
    if args.tier_journal == "off":
        return {"JOURNAL_MEMORY_SECONDS": "0", "JOURNAL_DIR": ""}
    if args.tier_journal == "disk":
        directory = tempfile.mkdtemp(prefix=f"bench-journal-{tier}-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        return {"JOURNAL_DIR": directory}
    return {"JOURNAL_DIR": ""}


def _profile_env(args: argparse.Namespace, tier: str, logs: Path) -> dict[str, str]:
    return {"PROXY_PROFILE": str(logs / f"{tier}.prof")} if args.profile == tier else {}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def passes(result: dict[str, Any]) -> bool:
    p99 = result["latency_ms"]["p99"]
    return result["lost_events"] == 0 and p99 is not None and p99 <= 50


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _rate(value: float | None) -> str:
    return "max" if value is None else f"{value:,.0f}"


def table(results: list[dict[str, Any]]) -> str:
    """One row per run: framing, rates, loss, latency, CPU per input event per tier, the harness's CPU."""
    header = (f"{'scenario':<14}{'framing':>9}{'ev/frame':>9}{'clients':>8}{'offered/s':>11}{'in/s':>9}"
              f"{'out/s':>11}{'lost':>8}{'p50ms':>7}{'p99ms':>7}{'maxms':>7}{'join ms':>8}"
              f"  CPU µs/event (tier)        client CPU %  sim CPU %  others CPU %  peak RSS MB")
    rows = [header, "-" * len(header)]
    for r in results:
        latency = r["latency_ms"]
        cpu = " ".join(f"{k}={v}" for k, v in r["cpu_us_per_input_event"].items())
        rss = " ".join(f"{k}={v}" for k, v in r["peak_rss_mb"].items())
        clients_cpu = "+".join(f"{value:.0f}" for value in r["client_cpu_percent"])
        rows.append(
            f"{r['scenario']:<14}{r['frame_events']:>9}{r['events_per_frame']:>9}{r['clients']:>8}"
            f"{_rate(r['rate_offered']):>11}{r['into_firehose_per_s']:>9,}{r['delivered_per_s']:>11,}"
            f"{r['lost_events']:>8}{_ms(latency['p50']):>7}{_ms(latency['p99']):>7}{_ms(latency['max']):>7}"
            f"{max(r['join_ms'], default=0):>8.0f}  {cpu:<27}{clients_cpu:>12}{r['cpu_percent']['simulator']:>11.0f}"
            f"{r['other_cpu_percent']:>14.0f}  {rss}"
        )
    return "\n".join(rows)


def warnings(result: dict[str, Any]) -> list[str]:
    """What makes a run's figures say less about the tiers than they seem to."""
    found = []
    if result["other_cpu_percent"] >= OTHERS_PERCENT:
        found.append(f"other processes on this machine used {result['other_cpu_percent']:.0f}% of a core during "
                     f"the window (the machine: {result['machine_cpu_percent']:.0f}% of {os.cpu_count()} cores): "
                     f"the tiers had that much less CPU")
    for index, percent in enumerate(result["client_cpu_percent"], 1):
        if percent >= SATURATED_PERCENT:
            found.append(f"client process {index} used {percent:.0f}% of a core: the clients may be what "
                         f"limits this run (raise --client-processes)")
    if result["clients_complete"] < result["clients"]:
        found.append(f"{result['clients'] - result['clients_complete']} of {result['clients']} clients did not "
                     f"see the closing mark ({len(result['client_processes_stopped'])} client process(es) "
                     f"stopped after waiting): what had not arrived by then counts as lost")
    for tier, drops in result["upstream_link_drops"].items():
        if drops:
            found.append(f"the {tier}'s upstream link went down {drops} time(s) during the run")
    if result["simulator_slow_consumer_drops"]:
        found.append(f"the simulator dropped the firehose as a slow consumer "
                     f"{result['simulator_slow_consumer_drops']} time(s) (its queue passed 250,000 events)")
    if result.get("source"):
        found.append("latency not measured: replayed events carry their recorded timestamps")
        if (result.get("replay_behind_seconds") or 0) >= 1:
            found.append(f"the replay fell up to {result['replay_behind_seconds']:.1f}s behind the recorded pace "
                         f"(nothing skipped: in/s is what was sent)")
    if result["simulator_events_skipped"]:
        found.append(f"the simulator could not keep the offered rate: {result['simulator_events_skipped']:,} "
                     f"events skipped (in/s is what was sent)")
    return found


def _framing(raw: str) -> int | str:
    try:
        return parse_frame_events(raw)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _framings(raw: str) -> list[int | str]:
    return [_framing(item) for item in raw.split(",") if item.strip()]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("filtered", "firehose-star", "idle"), default="filtered")
    parser.add_argument("--clients", type=int, help="default: 100 (filtered), 1000 (idle), 4 (firehose-star)")
    parser.add_argument("--rate", type=float, default=20_000, help="offered events/s (default 20000)")
    parser.add_argument("--frame-events", type=_framing, default=FRAME_TICK, metavar="N|adaptive|tick",
                        help="events per simulator frame (default tick: rate / 100, at most 200)")
    parser.add_argument("--framings", type=_framings, metavar="LIST",
                        help="run the scenario once per framing, e.g. 1,10,200 (overrides --frame-events)")
    parser.add_argument("--client-processes", type=int, default=2,
                        help="processes the clients are split over (default 2: one took 94%% of a core "
                             "at the default scenario)")
    parser.add_argument("--workers", type=int, default=1,
                        help="FILTERED_PROXY_WORKERS of the filtered proxy (default 1); its CPU and memory "
                             "are the parent's and its workers' together")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds before measuring (default 3)")
    parser.add_argument("--drain-seconds", type=float, default=30,
                        help="after the closing mark, how long the clients may take to see it; then they are "
                             "stopped and what they had not received counts as lost (default 30)")
    parser.add_argument("--sweep", action="store_true",
                        help="double the rate from --rate until loss or p99 > 50 ms; report the highest that passed")
    parser.add_argument("--queue-events", type=int, default=50_000, help="CLIENT_QUEUE_EVENTS for the tiers")
    parser.add_argument("--prebuilt", type=int, default=300_000, help="pre-built simulator events to cycle")
    parser.add_argument("--seed", type=int, default=1, help="seed of the client subscription plan")
    parser.add_argument("--tier-journal", choices=("off", "memory", "disk"), default="memory",
                        help="the tiers' own journal: off (JOURNAL_MEMORY_SECONDS=0), memory (the default: "
                             "300 s / 256 MB in memory), disk (memory and a JOURNAL_DIR per tier)")
    parser.add_argument("--profile", choices=("firehose", "filtered"),
                        help="run that tier under cProfile; the statistics go to the run's log folder")
    parser.add_argument("--json", type=Path, help="where to write the results (default bench-results/<time>.json)")
    parser.add_argument("--journal", type=Path, metavar="DIR",
                        help="replay this recording (a journal directory) instead of the simulator's synthetic data")
    parser.add_argument("--speed", default="1", metavar="N|max",
                        help="with --journal: N times the recorded pace, or max (default 1)")
    args = parser.parse_args(argv)
    args.recording = None
    if args.journal is not None:
        if args.sweep or args.framings:
            parser.error("--sweep and --framings are for the simulator's data; with --journal give --speed")
        try:
            parse_speed(args.speed)
        except ValueError as error:
            parser.error(f"--speed: {error}")
        args.recording = _profile(parser, args.journal)
        args.frame_events = "recorded"
    if args.clients is None:
        args.clients = {"filtered": 100, "idle": 1000, "firehose-star": 4}[args.scenario]
    if args.client_processes < 1:
        parser.error("--client-processes must be at least 1")
    if args.framings == []:
        parser.error("--framings needs at least one framing")
    return args


def _profile(parser: argparse.ArgumentParser, directory: Path) -> Any:
    from bench.recording import profile_journal

    try:
        profile = profile_journal(directory)
    except OSError as error:
        parser.error(f"--journal: cannot read {directory}: {error.strerror or error}")
    if not profile.events:
        parser.error(f"--journal: {directory} holds no events (python -m proxy.journal ls {directory})")
    return profile


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    results = []
    for frame_events in args.framings or [args.frame_events]:
        rate = args.rate
        while True:
            result = run_once(args, rate, frame_events)
            results.append(result)
            _progress(table([result]))
            if not args.sweep or not passes(result):
                break
            rate *= 2
    print(table(results))
    for r in results:
        print(f"CPU use during the window (% of one core), frames of {r['frame_events']} at "
              f"{_rate(r['rate_offered'])}/s: " + ", ".join(f"{name} {value}" for name, value in r["cpu_percent"].items())
              + f"; other processes {r['other_cpu_percent']}")
        for warning in warnings(r):
            print(f"warning: {warning}")
    if args.sweep:
        for frame_events in args.framings or [args.frame_events]:
            passing = [r["rate_offered"] for r in results if passes(r) and r["frame_events"] == str(frame_events)]
            print(f"frames of {frame_events}: highest offered rate with zero loss and p99 <= 50 ms: "
                  f"{max(passing):,.0f} events/s" if passing else f"frames of {frame_events}: no rate passed")
    path = args.json or Path("bench-results") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{args.scenario}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "arguments": {k: str(v) for k, v in vars(args).items() if k != "recording"}, "results": results,
    }, indent=2))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
