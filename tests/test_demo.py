"""The README's first command: scripts/demo runs the main job end to end (on free ports here).

Every run sets PROXY_VENV to the environment these tests run in, so that scripts/demo uses it as
it is: a test never creates a venv or reinstalls the project into the one under it.
"""

import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "scripts" / "demo"
PORT_VARIABLES = ("DEMO_SIMULATOR_PORT", "DEMO_FIREHOSE_PORT", "DEMO_FILTERED_PORT", "DEMO_METRICS_PORT")
STOPPED = "==> stopped; logs were in "


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now (all probes held open together, so none is handed out twice)."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def demo_env(**overrides: str) -> dict[str, str]:
    ports = dict(zip(PORT_VARIABLES, map(str, free_ports(len(PORT_VARIABLES)))))
    return {**os.environ, "PROXY_VENV": sys.prefix, **ports, **overrides}


def run_demo(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs scripts/demo in its own process group; on a timeout the whole group is killed."""
    process = subprocess.Popen(["bash", str(DEMO), *args], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever the demo left behind, if anything
    except ProcessLookupError:
        pass
    process.communicate()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_demo_runs_the_chain_and_prints_the_filtered_stream():
    result = run_demo("--seconds", "3", env=demo_env(), timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "==> installing" not in out and "==> creating" not in out  # the venv under the test is left alone
    assert '"message":"subscribed to: T.AAPL"' in out
    # every status on a line of its own, as the events are: the first two too, not as arrays
    assert re.search(r'^\{"ev":"status","status":"connected",', out, flags=re.MULTILINE), out[:2000]
    assert re.search(r'^\{"ev":"status","status":"auth_success",', out, flags=re.MULTILINE), out[:2000]
    assert not re.search(r"^\[\{", out, flags=re.MULTILINE), out[:2000]
    trades = re.findall(r'^\{"ev":"(\w+)","sym":"(\w+)"', out, flags=re.MULTILINE)
    assert trades and set(trades) == {("T", "AAPL")}  # only what it subscribed to
    summaries = re.findall(r"^-- last second: (\d+) events out .* proxy events in so far: (\d+)$", out,
                           flags=re.MULTILINE)
    assert summaries, out[-2000:]
    assert int(summaries[-1][1]) > sum(int(n) for n, _ in summaries)  # in: every trade and quote
    assert out.count(STOPPED) == 1


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_the_variables_and_starts_nothing(flag):
    result = run_demo(flag, env=demo_env(), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "scripts/demo --seconds 20" in result.stdout
    for variable in (*PORT_VARIABLES, "DEMO_CHANNELS"):
        assert variable in result.stdout
    assert "==> starting" not in result.stdout and result.stderr == ""


def test_an_unknown_argument_prints_the_usage_on_stderr_and_exits_2():
    result = run_demo("--second", "3", env=demo_env(), timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "unknown argument: --second" in result.stderr and "scripts/demo --seconds 20" in result.stderr


@pytest.mark.parametrize("variable", PORT_VARIABLES)
def test_a_busy_port_is_named_with_its_variable_before_anything_starts(variable):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_demo("--seconds", "3", env=demo_env(**{variable: str(port)}), timeout=60)
    assert result.returncode == 1
    # said before anything starts (it used to wait 10 s for the tier that could not bind, then
    # say that tier was not ready): the one line, and no "==> starting"
    assert f"port {port} on 127.0.0.1" in result.stderr and "already in use" in result.stderr
    assert f"choose another with {variable}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert "==> starting" not in result.stdout


def test_a_part_that_exits_while_starting_ends_the_wait_at_once_with_its_log():
    # A value the simulator rejects: it exits at once, after the port check has passed.
    result = run_demo("--seconds", "3", env=demo_env(DEMO_EVENTS_PER_SECOND="lots"), timeout=60)
    assert result.returncode == 1
    # noticed when it exits, not after the 10 s the demo gives a part to get ready ("not ready after 10 s")
    assert "not ready after" not in result.stderr
    assert "the simulator exited" in result.stderr
    assert "SIMULATOR_EVENTS_PER_SECOND" in result.stderr  # the end of its log
    assert result.stdout.count(STOPPED) == 1


def start_and_wait_for_the_stream(env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """Starts scripts/demo as a terminal's shell would, and returns once its client prints a summary.

    A shell started with SIGINT ignored can never trap it (bash: "signals ignored upon entry cannot
    be trapped"), and a child inherits an ignored SIGINT: when the tests run in the background (a
    CI step, `pytest &`), the demo would start so, where no terminal starts it so. So SIGINT is
    this process's default handler while the demo starts, which exec turns into SIG_DFL.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(["bash", str(DEMO)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("-- last second:"):
            return process, lines
    kill_group(process)
    pytest.fail("the demo ended before the client printed a summary:\n" + "".join(lines))


@pytest.mark.parametrize(("how", "status"), [("ctrl-c", 130), ("sigterm", 143)])
def test_stopping_the_demo_stops_every_part_and_says_so_once(how, status):
    env = demo_env()
    process, lines = start_and_wait_for_the_stream(env)
    try:
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        else:
            process.send_signal(signal.SIGTERM)  # what `kill PID` or a supervisor does: the script alone
        out, err = process.communicate(timeout=20)
        still_listening = [variable for variable in PORT_VARIABLES if not port_is_free(int(env[variable]))]
    finally:
        kill_group(process)  # only after the check: this would hide a part left running
    out = "".join(lines) + out
    assert out.count(STOPPED) == 1, out[-2000:]  # it used to say it twice
    assert process.returncode == status, (err, out[-1000:])
    assert "Traceback" not in err
    assert still_listening == []
