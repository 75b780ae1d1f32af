"""The deployment files agree with the code: variables that exist, modules that run.

Docker is not on the machines this project is tested on, so the image is not built here;
this checks what can be checked without it, and runs the image's HEALTHCHECK command against
real tiers. systemd's own rating of the units' sandbox runs where systemd-analyze (250 or
later) is installed.
"""

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy.app import config
from tests.helpers import start_chain
import attrs

ROOT = Path(__file__).parent.parent
DOCUMENTED = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), flags=re.MULTILINE))


def test_compose_sets_only_real_variables_and_runs_real_tiers():
    compose = (ROOT / "docker-compose.yml").read_text()
    variables = set(re.findall(r"^\s{6}([A-Z_]+):", compose, flags=re.MULTILINE))
    assert variables and variables <= DOCUMENTED, variables - DOCUMENTED
    modules = re.findall(r'command: \["(proxy\.[a-z]+)"\]', compose)
    assert sorted(modules) == ["proxy.filtered", "proxy.firehose", "proxy.simulator"]
    for module in modules:
        assert callable(importlib.import_module(module).main)


def test_dockerfile_and_units_start_tiers_through_trio_run():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["trio-run"]' in dockerfile and "pip install --no-cache-dir ." in dockerfile
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        module = re.search(r"ExecStart=\S+/trio-run (proxy\.[a-z]+)", unit.read_text()).group(1)
        assert callable(importlib.import_module(module).main)
        assert "KillSignal=SIGTERM" in unit.read_text()


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """A unit's ``Key=value`` lines; a key may repeat (SystemCallFilter=), so each maps to a list."""
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def test_units_do_not_restart_a_bad_configuration_in_a_loop(tmp_path):
    # the code's side: a bad value exits 2 (one line naming the variable)...
    env = {"PATH": os.environ.get("PATH", ""), "POLYGON_API_KEY": "k", "FIREHOSE_PORT": "not-a-port"}
    result = subprocess.run([sys.executable, "-m", "proxy.firehose"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "FIREHOSE_PORT" in result.stderr, result.stderr
    # ...and the units' side: systemd does not restart that exit every RestartSec
    assert len(UNITS) == 2
    for unit in UNITS:
        settings = unit_settings(unit)
        assert settings["Restart"] == ["always"], unit.name
        assert settings.get("RestartPreventExitStatus") == ["2"], unit.name


def test_units_say_that_the_working_directory_also_supplies_a_dot_env():
    for unit in UNITS:
        lines = unit.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("WorkingDirectory="))
        comment = []
        for line in reversed(lines[:at]):
            if not line.startswith("#"):
                break
            comment.append(line)
        assert ".env" in " ".join(comment), f"{unit.name}: say above WorkingDirectory= that it loads .env"


def test_units_are_sandboxed_but_keep_what_the_tier_needs():
    for unit in UNITS:
        settings = unit_settings(unit)
        for key, value in {"NoNewPrivileges": "true", "ProtectSystem": "strict", "ProtectHome": "true",
                           "PrivateTmp": "true", "PrivateDevices": "true", "CapabilityBoundingSet": "",
                           "RestrictNamespaces": "true", "SystemCallArchitectures": "native"}.items():
            assert settings.get(key) == [value], (unit.name, key, settings.get(key))
        # TCP in and out over IPv4 and IPv6, and AF_UNIX for Trio's wake-up socketpair
        families = set(settings["RestrictAddressFamilies"][0].split())
        assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families, (unit.name, families)
        # a sandbox that hides the code or the configuration would stop the tier
        assert not {"ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "RootDirectory"} & set(settings)
        assert settings["WorkingDirectory"][0].startswith("/opt/") and settings["User"] != ["root"]


def test_units_rate_under_4_in_systemd_analyze_security():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    version = subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout
    if int(re.search(r"systemd (\d+)", version).group(1)) < 250:
        pytest.skip(f"systemd-analyze security --offline needs systemd 250 or later: {version.splitlines()[0]}")
    for unit in UNITS:
        # --threshold is on the 0-100 scale: 39 is an exposure of 3.9; above it, exit 1
        result = subprocess.run([analyze, "security", "--offline=true", "--threshold=39", str(unit)],
                                capture_output=True, text=True, timeout=60)
        overall = re.search(r"Overall exposure level for \S+: (.+)", result.stdout)
        assert result.returncode == 0, (unit.name, overall and overall.group(1), result.stderr[-2000:])


def test_dockerfile_exposes_the_default_ports_of_every_tier(monkeypatch, tmp_path):
    for name in [*DOCUMENTED, "PROXY_ENV_FILE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here: the defaults
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    firehose, filtered = config.load_firehose_config(), config.load_filtered_config()
    defaults = {firehose.port, firehose.metrics_port, filtered.port, filtered.metrics_port,
                config.load_simulator_config().port}
    exposed = re.findall(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert len(exposed) == 1 and {int(port) for port in exposed[0].split()} == defaults


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's command, as Docker reads its exec form: a JSON array."""
    found = re.findall(r"^HEALTHCHECK (?:--\S+ )*CMD (\[.+\])$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert len(found) == 1, "one HEALTHCHECK in exec form, on one line"
    command = json.loads(found[0])
    assert command[:2] == ["python", "-c"] and len(command) == 3, "python only: the image has no curl"
    return command


async def test_dockerfile_healthcheck_passes_for_each_running_tier_and_fails_without_one(nursery):
    code = dockerfile_healthcheck()[2]
    closed = socket.socket()  # bound, never listening: connecting to it is refused, as to a dead tier
    closed.bind(("127.0.0.1", 0))
    dead = str(closed.getsockname()[1])
    sim, firehose, filtered = await start_chain(nursery, firehose=dict(metrics_port=0), filtered=dict(metrics_port=0),
                                                connected=False)  # /healthz answers whether or not the links are up

    async def check(**ports: str) -> int:
        env = {"PATH": os.environ.get("PATH", ""), "FIREHOSE_METRICS_PORT": dead,
               "FILTERED_METRICS_PORT": dead, "SIMULATOR_PORT": dead, **ports}
        result = await trio.run_process([sys.executable, "-c", code], env=env, check=False, capture_stderr=True)
        assert not result.stderr, result.stderr.decode()
        return result.returncode

    try:
        assert await check(FIREHOSE_METRICS_PORT=str(firehose.metrics_port)) == 0
        assert await check(FILTERED_METRICS_PORT=str(filtered.metrics_port)) == 0
        assert await check(FIREHOSE_METRICS_PORT="0", FILTERED_METRICS_PORT=str(filtered.metrics_port)) == 0
        assert await check(SIMULATOR_PORT=str(sim.port)) == 0  # the simulator has no HTTP side
        assert await check() == 1  # nothing alive
        assert await check(FIREHOSE_METRICS_PORT="0", FILTERED_METRICS_PORT="0") == 1  # metrics off
        # a tier's WebSocket port is not its health endpoint
        assert await check(FILTERED_METRICS_PORT=str(filtered.port)) == 1
    finally:
        closed.close()
def test_units_allow_a_descriptor_per_client_and_more():
    from proxy.core.settings import TierConfig

    max_clients = attrs.fields(TierConfig).max_clients.default
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        limit = re.search(r"^LimitNOFILE=(\d+)$", unit.read_text(), flags=re.MULTILINE)
        assert limit and int(limit.group(1)) > 2 * max_clients, unit.name
