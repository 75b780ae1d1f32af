"""scripts/_venv.sh: when scripts/demo and scripts/test (re)install the project, and what a new user sees.

The fast tests run ensure_venv in a scratch copy of the project whose .venv/bin/python is a stub
that records its arguments, so they show exactly when pip would run, without running it.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def scratch_root(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "_venv.sh", root / "scripts")
    (root / "setup.cfg").write_text("")
    (root / "pyproject.toml").write_text("")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "python"
    stub.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/../calls"\n')
    stub.chmod(0o755)
    return root


def age(path: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


def installed_root(tmp_path: Path, stamp: str) -> Path:
    """A scratch project installed with one stamp (``.installed`` or ``.installed[test]``), its
    metadata older than the stamp."""
    root = scratch_root(tmp_path)
    (root / ".venv" / stamp).touch()
    for metadata in ("setup.cfg", "pyproject.toml"):
        age(root / metadata, 100)
    return root


def ensure_venv(root: Path, extras: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    environment = {key: value for key, value in os.environ.items() if key != "PROXY_VENV"} | env
    result = subprocess.run(["bash", "-c", 'source "$1"; ensure_venv "$2"', "_", str(root / "scripts" / "_venv.sh"),
                             extras], env=environment, capture_output=True, text=True, timeout=60)
    calls = root / ".venv" / "calls"
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_the_test_install_serves_the_demo_without_a_reinstall(tmp_path):
    # scripts/test stamps .installed[test]; scripts/demo (and so tests/test_demo.py, inside the
    # venv under test) asked for .installed and reinstalled the project when it was missing.
    root = installed_root(tmp_path, ".installed[test]")
    result, calls = ensure_venv(root, "")
    assert result.returncode == 0, result.stderr
    assert calls == [] and result.stdout == ""


def test_changed_metadata_still_reinstalls(tmp_path):
    root = scratch_root(tmp_path)
    for stamp in (".installed", ".installed[test]"):
        (root / ".venv" / stamp).touch()
        age(root / ".venv" / stamp, 100)
    result, calls = ensure_venv(root, "")  # setup.cfg is newer than both stamps
    assert result.returncode == 0, result.stderr
    assert "==> installing the project into .venv" in result.stdout
    assert any(call.endswith(f"-e {root}") for call in calls), calls
    assert (root / ".venv" / ".installed").stat().st_mtime > time.time() - 50  # stamped again

    _, calls_again = ensure_venv(root, "")
    assert calls_again == calls  # now up to date: nothing more


def test_the_plain_install_does_not_serve_the_tests(tmp_path):
    root = installed_root(tmp_path, ".installed")
    result, calls = ensure_venv(root, "[test]")
    assert result.returncode == 0, result.stderr
    assert any(call.endswith(f"-e {root}[test]") for call in calls), calls


def test_proxy_venv_is_used_as_it_is(tmp_path):
    root = scratch_root(tmp_path)  # no stamp at all: without PROXY_VENV this would install
    result, calls = ensure_venv(root, "", PROXY_VENV=str(root / ".venv"))
    assert result.returncode == 0, result.stderr
    assert calls == [] and result.stdout == ""

    result, _ = ensure_venv(root, "", PROXY_VENV=str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "PROXY_VENV" in result.stderr and not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_a_first_install_prints_only_its_own_progress(tmp_path):
    """What a new user sees from the first scripts/demo: a real venv, a real pip, from the registry.

    The install used to end with setuptools' 10-line "Editable installation." banner (relayed by
    recent pip even under --quiet). PIP_CONFIG_FILE=/dev/null leaves out this machine's own pip
    configuration, whose extra indexes add lines of their own that no user of the project sees.
    """
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "_venv.sh", root / "scripts")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, root)
    shutil.copytree(ROOT / "proxy", root / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if key not in ("PROXY_VENV", "VIRTUAL_ENV")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PYTHON": sys.executable}
    command = ["bash", "-c", 'source "$1"; ensure_venv ""', "_", str(root / "scripts" / "_venv.sh")]

    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = (first.stdout + first.stderr).splitlines()
    assert [line for line in lines if not line.startswith("==> ")] == [], "\n".join(lines)
    assert any(line.startswith("==> installing the project") for line in lines)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")  # installed: nothing to do

    trio_run = root / ".venv" / "bin" / "trio-run"
    assert trio_run.exists()
    imported = subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == str(root / "proxy" / "__init__.py")  # editable: the working tree
