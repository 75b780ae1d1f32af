"""The deployment files agree with the code: variables that exist, modules that run.

Docker and systemd are not on the machines this project is tested on, so the image is
not built here; this checks what can be checked without them.
"""

import importlib
import re
from pathlib import Path

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


def test_units_allow_a_descriptor_per_client_and_more():
    from proxy.config import TierConfig

    max_clients = attrs.fields(TierConfig).max_clients.default
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        limit = re.search(r"^LimitNOFILE=(\d+)$", unit.read_text(), flags=re.MULTILINE)
        assert limit and int(limit.group(1)) > 2 * max_clients, unit.name
