"""The filtered proxy on every core: N worker processes on one client port, under one parent.

With ``FILTERED_PROXY_WORKERS=N`` (N > 1) ``trio-run proxy.filtered`` becomes this
parent. It owns the client port (a socket bound with ``SO_REUSEPORT`` that does not
listen, so a port of 0 picks one free port for all), starts N workers
(:mod:`proxy.app.worker`), each a whole filtered tier with its own link to the
firehose listening on that port with ``SO_REUSEPORT`` (the kernel spreads new clients
over them), restarts a worker that dies (logged, with a growing pause if it keeps dying
at once), and on SIGTERM stops them all and exits 0. Its metrics port is the tier's one
endpoint: ``/metrics`` merges every worker's families, each sample labelled ``worker``;
``/readyz`` is ready when every worker is; ``/clients`` and ``/status.json`` cover every
worker's clients (a client's id is ``<worker>-<id>``). It asks the workers on request,
over loopback: nothing is computed on anyone's hot path.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Awaitable, Callable, Iterable

import attrs
import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ..core.settings import TierConfig
from ..net.accepting import reserve_shared_port
from ..net.http import HttpRequest, HttpResponse, http_get, serve_http
from .admin import JSON, allowed, forbidden, login, static_file
from .config import bind_error

__all__ = ["RESTART_PAUSE_MAX", "WorkerSlot", "Workers", "merge_clients", "merge_metrics", "merge_status",
           "make_workers_handler", "run_workers"]

log = logging.getLogger("proxy.workers")

#: A worker that dies within this long of starting is restarted after a pause that doubles,
#: up to RESTART_PAUSE_MAX, so a worker that cannot start does not spin.
QUICK_DEATH_SECONDS = 10.0
RESTART_PAUSE_MAX = 30.0
#: How long a worker may take to start listening before it is counted as failed.
START_TIMEOUT = 60.0
#: How long the workers get to stop on SIGTERM before they are killed.
STOP_SECONDS = 10.0
ASK_TIMEOUT = 5.0
_encode = msgspec.json.encode


@attrs.define
class WorkerSlot:
    """One worker's place: its number, the process now filling it, where it serves its views."""

    index: int
    pid: int | None = None
    metrics_port: int | None = None
    started_at: float | None = None
    restarts: int = 0
    ready: trio.Event = attrs.field(factory=trio.Event)


@attrs.define
class Workers:
    """The running parent, as ``task_status`` reports it: the shared client port, its metrics port, the slots."""

    config: TierConfig
    port: int
    slots: list[WorkerSlot]
    metrics_port: int | None = None


async def run_workers(
    config: TierConfig, *, task_status: trio.TaskStatus[Workers] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``config.workers`` workers on one port until cancelled; reports :class:`Workers`
    once every worker listens. Raises ConfigError when a port cannot be opened."""
    try:
        reserved = await reserve_shared_port(config.host, config.port)
    except OSError as error:
        raise bind_error(config.port_setting, config.host, config.port, error) from None
    try:
        port = reserved[0].getsockname()[1]
        workers = Workers(config, port, [WorkerSlot(index) for index in range(1, config.workers + 1)])
        log.info("Starting %d workers on port %d (SO_REUSEPORT: the kernel spreads clients over them)",
                 config.workers, port)
        async with trio.open_nursery() as nursery:
            for slot in workers.slots:
                nursery.start_soon(_keep_worker, slot, port)
            if config.metrics_port is not None:
                try:
                    workers.metrics_port = await nursery.start(
                        functools.partial(serve_http, name=f"{config.tier} tier ({config.workers} workers)"),
                        config.host, config.metrics_port, make_workers_handler(workers))
                except OSError as error:
                    raise bind_error(config.metrics_port_setting, config.host, config.metrics_port, error) from None
            for slot in workers.slots:
                await slot.ready.wait()
            log.info("All %d workers listen on ws://%s:%d", config.workers, config.host, port)
            task_status.started(workers)
    finally:
        for sock in reserved:
            sock.close()


async def _keep_worker(slot: WorkerSlot, port: int) -> None:
    """Run worker ``slot.index`` and start it again whenever it exits, until cancelled."""
    pause = 1.0
    while True:
        started = trio.current_time()
        code = await _run_worker(slot, port)
        lived = trio.current_time() - started
        pause = min(pause * 2, RESTART_PAUSE_MAX) if lived < QUICK_DEATH_SECONDS else 1.0
        slot.restarts += 1
        log.error("worker %d (pid %s) exited with %s after %.1fs; starting it again in %.0fs",
                  slot.index, slot.pid, _describe_exit(code), lived, pause)
        slot.pid = slot.metrics_port = None
        await trio.sleep(pause)


async def _run_worker(slot: WorkerSlot, port: int) -> int | None:
    """Start the worker process, learn where it listens, wait for it to exit; its exit code.

    Cancelled (the parent stops): SIGTERM, then SIGKILL after :data:`STOP_SECONDS`."""
    command = [sys.executable, "-m", "proxy.app.worker", str(slot.index), str(port)]
    process = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    slot.pid, slot.started_at = process.pid, time.time()
    try:
        assert process.stdout is not None
        with trio.move_on_after(START_TIMEOUT) as starting:
            line = await _read_line(process.stdout)
        if starting.cancelled_caught or line is None:
            log.error("worker %d (pid %d) did not start listening%s", slot.index, process.pid,
                      f" within {START_TIMEOUT:.0f}s" if starting.cancelled_caught else "")
            process.kill()
        else:
            ready = json.loads(line)
            slot.metrics_port = ready["metrics_port"]
            log.info("worker %d (pid %d) listens", slot.index, process.pid)
            slot.ready.set()
        return await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process, slot.index)


async def _stop(process: trio.Process, index: int) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_SECONDS):
        await process.wait()
        return
    log.error("worker %d (pid %d) did not stop within %.0fs of SIGTERM: killed", index, process.pid, STOP_SECONDS)
    process.kill()
    await process.wait()


async def _read_line(stream: trio.abc.ReceiveStream) -> str | None:
    buffer = bytearray()
    while b"\n" not in buffer:
        data = await stream.receive_some(4096)
        if not data:
            return None
        buffer += data
    return buffer.split(b"\n", 1)[0].decode()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


# --- the one metrics port for every worker ----------------------------------------------------------


def merge_metrics(texts: Iterable[tuple[int, str]]) -> bytes:
    """The Prometheus text of several workers as one exposition: each family once, every
    sample labelled ``worker`` with the number of the worker that reported it."""
    families: dict[str, Metric] = {}
    for index, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def merge_clients(lists: Iterable[tuple[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Every worker's ``/clients`` as one list; each client's id becomes ``<worker>-<id>``."""
    merged = [{**view, "id": f"{index}-{view['id']}", "worker": index} for index, views in lists for view in views]
    merged.sort(key=lambda view: (view["worker"], int(str(view["id"]).split("-")[1])))
    return merged


def merge_status(statuses: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Every worker's ``/status.json`` as one: clients, rates (per second) and keys summed;
    the upstream shown is the first worker's whose link is not connected, else the first's;
    each worker's own line under ``workers``."""
    if not statuses:
        return {}
    first = statuses[0][1]
    down = [status for _index, status in statuses if status["upstream"]["state"] != "connected"]
    upstream = dict((down or [first])[0]["upstream"])
    upstream["reconnects"] = sum(status["upstream"]["reconnects"] for _index, status in statuses)
    upstream["outages"] = sorted((outage for _index, status in statuses for outage in status["upstream"]["outages"]),
                                 key=lambda outage: outage["began_ms"])
    rates: dict[int, dict[str, int]] = defaultdict(lambda: {"events_in": 0, "events_out": 0})
    keys: dict[str, dict[str, int]] = defaultdict(lambda: {"clients": 0, "events_sent": 0, "events_dropped": 0})
    for _index, status in statuses:
        for rate in status["rates"]:
            second = rates[rate["t_ms"] // 1000 * 1000]
            second["events_in"] += rate["events_in"]
            second["events_out"] += rate["events_out"]
        for key in status["keys"]:
            totals = keys[key["key"]]
            for name in totals:
                totals[name] += key[name]
    return {
        **first,
        "clients_connected": sum(status["clients_connected"] for _index, status in statuses),
        "upstream": upstream,
        "rates": [{"t_ms": t_ms, **rate} for t_ms, rate in sorted(rates.items())],
        "keys": [{"key": name, **totals} for name, totals in sorted(keys.items())],
        "workers": [{"worker": index, "clients_connected": status["clients_connected"],
                     "upstream_state": status["upstream"]["state"]} for index, status in statuses],
    }


def make_workers_handler(workers: Workers) -> Callable[[HttpRequest], Awaitable[HttpResponse]]:
    """The parent's metrics port: the same paths as a tier's, answered by asking every worker."""
    config = workers.config
    token = config.admin_token
    auth = (("authorization", f"Bearer {token}"),) if token else ()

    async def ask_all(path: str) -> list[tuple[int, int, bytes]]:
        """``(worker, status, body)`` from every worker now listening; status 0 if it did not answer."""
        answers: list[tuple[int, int, bytes]] = []

        async def ask(slot: WorkerSlot) -> None:
            if slot.metrics_port is None:
                answers.append((slot.index, 0, b"not running"))
                return
            try:
                status, body = await http_get("127.0.0.1", slot.metrics_port, path, headers=auth, timeout=ASK_TIMEOUT)
            except (OSError, trio.TooSlowError, ValueError) as error:
                status, body = 0, f"did not answer: {error or type(error).__name__}".encode()
            answers.append((slot.index, status, body))

        async with trio.open_nursery() as nursery:
            for slot in workers.slots:
                nursery.start_soon(ask, slot)
        answers.sort()
        return answers

    async def handle(request: HttpRequest) -> HttpResponse:
        path = request.path
        if path == "/healthz":
            running = sum(slot.metrics_port is not None for slot in workers.slots)
            return HttpResponse(200, f"ok: {running} of {len(workers.slots)} workers running\n".encode())
        if path == "/readyz":
            answers = await ask_all("/readyz")
            lines = [f"worker {index}: {body.decode(errors='replace').strip()}" for index, _status, body in answers]
            ready = all(status == 200 for _index, status, _body in answers)
            return HttpResponse(200 if ready else 503, ("\n".join(lines) + "\n").encode())
        if path == "/metrics":
            answers = await ask_all("/metrics")
            texts = [(index, body.decode()) for index, status, body in answers if status == 200]
            return HttpResponse(200, merge_metrics(texts), CONTENT_TYPE_LATEST)
        if path == "/" or path == "/status.json" or path.startswith(("/clients", "/static/")):
            if not allowed(request, token):
                return forbidden(token)
            return await operator_view(path)
        if path == "/login":
            return login(request, token)
        return HttpResponse(404, (f"not found: this is the {config.tier} tier's health and metrics port "
                                  f"({len(workers.slots)} workers); try /healthz, /readyz, /metrics, or / for the "
                                  "status page\n").encode())

    async def operator_view(path: str) -> HttpResponse:
        if path == "/":
            return static_file("status.html")
        if path.startswith("/static/"):
            return static_file(path.removeprefix("/static/"))
        if path == "/status.json":
            answers = await ask_all("/status.json")
            statuses = [(index, json.loads(body)) for index, status, body in answers if status == 200]
            return HttpResponse(200, _encode(merge_status(statuses)), JSON)
        if path in ("/clients", "/clients/"):
            answers = await ask_all("/clients")
            lists = [(index, json.loads(body)) for index, status, body in answers if status == 200]
            return HttpResponse(200, _encode(merge_clients(lists)), JSON)
        wanted = path.removeprefix("/clients/")
        worker, _, client = wanted.partition("-")
        slot = next((slot for slot in workers.slots if str(slot.index) == worker), None)
        if slot is None or slot.metrics_port is None or not client.isdigit():
            return HttpResponse(404, f"no client {wanted!r} is connected (ids are <worker>-<id>)\n".encode())
        status, body = await http_get("127.0.0.1", slot.metrics_port, f"/clients/{client}", headers=auth,
                                      timeout=ASK_TIMEOUT)
        if status != 200:
            return HttpResponse(status or 502, body)
        view = json.loads(body)
        return HttpResponse(200, _encode({**view, "id": wanted, "worker": slot.index}), JSON)

    return handle

