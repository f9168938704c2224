"""`check`'s rough edges (issue 12): the nearest key or option is suggested, values are quoted
as the YAML spelled them, problems come in the order of the file's lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.config.test_load import problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "expected"), [
    # A misspelled fallback option: the nearest, not the list of every option.
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {fallback: {type: cache, max_age: 60}}}\n",
     "F:4: services.a.routes.r.fallback.max_age: unknown option for a cache fallback (did you mean max_age_s?)"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {fallback: {type: queue, exposure_cpa: 9}}}\n",
     "F:4: services.a.routes.r.fallback.exposure_cpa: unknown option for a queue fallback "
     "(did you mean exposure_cap?)"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {fallback: {type: static, file: ok.json, "
     "on_falure: false}}}\n",
     "F:4: services.a.routes.r.fallback.on_falure: unknown option for a static fallback (did you mean on_failure?)"),
    # Nothing near: then the short list is the help.
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {fallback: {type: static, file: ok.json, "
     "colour: red}}}\n",
     "F:4: services.a.routes.r.fallback.colour: unknown option for a static fallback "
     "(known: type, on_failure, file, status)"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes:\n      r:\n        fallback:\n"
     "          {type: table, default_row: w, rows: {w: {cost: 1, curency: EUR}}}\n",
     "F:7: services.a.routes.r.fallback.rows: row 'w': curency: unknown field (did you mean currency?)"),
    # Values as YAML spelled them, and why YAML read them so.
    ("defaults: {jitter: yes}\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:1: defaults.jitter: not a number: 'yes' (YAML reads it as a boolean)"),
    ("defaults:\n  failure_threshold: off\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:2: defaults.failure_threshold: not an integer: 'off' (YAML reads it as a boolean)"),
    ("server: {host: ~}\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:1: server.host: not a non-empty string: '~' (YAML reads it as null)"),
    ("defaults: {failure_statuses: [500, on]}\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:1: defaults.failure_statuses: not an integer: 'on' (YAML reads it as a boolean)"),
    ("storage: {path: 2024-01-01}\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:1: storage.path: not a non-empty string: '2024-01-01' (YAML reads it as a date)"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {fallback: {type: queue, max_depth: yes}}}\n",
     "F:4: services.a.routes.r.fallback.max_depth: must be an integer ≥ 1, got 'yes' (YAML reads it as a boolean)"),
    # Quoted, it is a string, and says so as before.
    ("defaults: {jitter: 'yes'}\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:1: defaults.jitter: not a number: 'yes'"),
])
def test_one_problem_as_a_reader_wants_it(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_problems_are_sorted_by_line_with_the_environment_last(tmp_path):
    found = problems(tmp_path, """
        services:
          a:
            upstream: http://h:1
            routes:
              r: {fallback: {type: cache, max_ag_s: 1}}
        defaults:
          success_threshold: 0
        server: {port: -1}
        bogus: 1
    """, {"CIRCUIT_BREAKER_TIMEOUT": "soon"})
    assert found == [
        "F:6: services.a.routes.r.fallback.max_ag_s: unknown option for a cache fallback (did you mean max_age_s?)",
        "F:8: defaults.success_threshold: must be ≥ 1, got 0",
        "F:9: server.port: must be ≥ 0, got -1",
        "F:10: bogus: unknown key",
        "env CIRCUIT_BREAKER_TIMEOUT: defaults.open_timeout_ms: not an integer: 'soon'",
    ]


def check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_check_without_a_path_checks_the_shipped_config_as_run_does():
    done = check()
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "config/breakers.yaml: ok (4 services, 8 breakers)\n", "")


def test_check_path_prints_sorted_problems_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("services: {a: {upstream: 'http://h:1'}}\ndefaults:\n  jitter: yes\n  timeout: 5\n"
                    "server: {port: 70000}\n")
    done = check(str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"{path}:3: defaults.jitter: not a number: 'yes' (YAML reads it as a boolean)",
        f"{path}:4: defaults.timeout: unknown key (did you mean timeout_ms?)",
        f"{path}:5: server.port: must be ≤ 65535, got 70000",
    ]
    missing = check(str(tmp_path / "nope.yaml"))
    assert (missing.returncode, missing.stderr) == (2, f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n")
