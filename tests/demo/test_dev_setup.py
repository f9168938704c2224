"""`./dev demo` installs only the package, quietly; `./dev test` still installs the test tools.

The real `dev` script runs in a copy of the project whose `.venv` holds recording stand-ins for
python and circuit-proxy (a real pip would need the package index); `apt-get` is not on the
PATH, so nothing is installed on this machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAND_IN = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
case "$*" in *"pip install"*) echo "WARNING: Running pip as the 'root' user can result in broken permissions" >&2 ;; esac
exit 0
"""


def project(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy2(ROOT / "dev", copy / "dev")
    shutil.copy2(ROOT / "pyproject.toml", copy / "pyproject.toml")
    venv_bin = copy / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "circuit-proxy"):
        (venv_bin / name).write_text(STAND_IN)
        (venv_bin / name).chmod(0o755)
    tools = tmp_path / "tools"  # what dev needs, and no apt-get, dpkg or sudo
    tools.mkdir()
    for tool in ("bash", "sh", "sha256sum", "cut", "cat", "dirname", "basename", "id", "env", "rm"):
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    (tools / "python3").symlink_to(sys.executable)  # only asked for its version here
    calls = tmp_path / "calls"
    return copy, calls, {"PATH": str(tools), "CALLS": str(calls), "HOME": str(tmp_path)}


def run(copy: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(copy / "dev"), *args], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=60)


def test_demo_installs_only_the_package_quietly_and_test_adds_the_test_tools(tmp_path):
    copy, calls, env = project(tmp_path)
    demo = run(copy, env, "demo", "--no-traffic")
    assert demo.returncode == 0, demo.stderr
    assert demo.stderr == "==> installing circuit-proxy into .venv\n"  # no pip warning shown
    assert calls.read_text().splitlines() == [
        "python -m pip install -q -U pip", "python -m pip install -q -e .", "circuit-proxy demo --no-traffic"]
    assert "WARNING" in (copy / ".venv" / "pip.log").read_text()  # kept for when pip fails

    calls.unlink()
    assert run(copy, env, "demo").returncode == 0  # set up: starts at once
    assert calls.read_text().splitlines() == ["circuit-proxy demo"]

    calls.unlink()
    test = run(copy, env, "test", "-k", "nothing")
    assert test.returncode == 0, test.stderr
    assert test.stderr == "==> installing circuit-proxy and its test dependencies into .venv\n"
    assert calls.read_text().splitlines() == [
        "python -m pip install -q -U pip", "python -m pip install -q -e .[test]",
        "python -m pytest -q -ra -k nothing"]

    calls.unlink()
    assert run(copy, env, "demo").returncode == 0  # the test venv serves the demo as it is
    assert calls.read_text().splitlines() == ["circuit-proxy demo"]


def test_a_failing_pip_shows_its_log_and_stops(tmp_path):
    copy, calls, env = project(tmp_path)
    python = copy / ".venv" / "bin" / "python"
    python.write_text('#!/bin/sh\necho "ERROR: No matching distribution found for aiohttp" >&2\nexit 1\n')
    failed = run(copy, env, "demo")
    assert failed.returncode != 0
    assert "No matching distribution found for aiohttp" in failed.stderr
    assert "pip install -U pip failed" in failed.stderr
    assert not calls.exists()  # the demo never started
    assert not (copy / ".venv" / ".installed").exists()
