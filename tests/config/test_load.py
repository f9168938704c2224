"""config_load: inheritance, environment overrides, and one precise message per problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.config.model import Match, Policy, WindowSpec
from proxy.config.load import ConfigError, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "fallback_responses").mkdir(exist_ok=True)
    (tmp_path / "fallback_responses" / "ok.json").write_text('{"status": 200, "body": "ok"}')
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ or {})
    return [p.replace(str(path), "F") for p in caught.value.problems]


def test_shipped_config_is_valid_and_wires_the_four_fallbacks():
    settings = load_settings(ROOT / "config" / "breakers.yaml", {})
    routes = {r.breaker_name: r for r in settings.routes()}
    assert {name: r.fallback.type for name, r in routes.items() if r.fallback} == {
        "payment.charges": "queue", "inventory.stock": "cache",
        "notification.notifications": "queue", "shipping.quotes": "table"}
    assert routes["payment.charges"].match == Match(methods=frozenset({"POST"}), path="/charges")
    assert routes["payment.charges"].fallback.options["floor_limit"] == 100
    assert routes["inventory.stock"].fallback.options["scale"] == {"available": 0.5}
    # The implicit default route is there for every service, last.
    assert [s.routes[-1].name for s in settings.services] == ["default"] * 4


def test_inheritance_route_over_service_over_env_over_defaults(tmp_path):
    path = write(tmp_path, """
        defaults: {failure_threshold: 7, success_threshold: 4, open_timeout_ms: 1000}
        services:
          a:
            upstream: http://127.0.0.1:1/base/
            failure_threshold: 2
            routes:
              r: {match: {path: /x/}, success_threshold: 9}
    """)
    env = {"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "11", "CIRCUIT_BREAKER_SUCCESS_THRESHOLD": "6",
           "CIRCUIT_BREAKER_TIMEOUT": "2500"}
    settings = load_settings(path, env)
    (service,) = settings.services
    assert service.upstream == "http://127.0.0.1:1/base"
    r, default = service.routes
    assert (r.name, default.name) == ("r", "default")
    assert r.match.path == "/x"
    # route > service > env > defaults
    assert (r.policy.failure_threshold, r.policy.success_threshold, r.policy.open_timeout_ms) == (2, 9, 2500)
    assert (default.policy.failure_threshold, default.policy.success_threshold) == (2, 6)
    assert default.policy.window == WindowSpec(type="count", size=20)


def test_env_overrides_builtin_defaults_when_no_defaults_section(tmp_path):
    path = write(tmp_path, "services: {a: {upstream: 'http://127.0.0.1:1'}}\n")
    settings = load_settings(path, {"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "3"})
    assert settings.services[0].routes[0].policy == Policy(failure_threshold=3)


def test_every_problem_is_reported_with_line_and_key_path(tmp_path):
    found = problems(tmp_path, """\
        server: {port: 70000}
        defaults:
          window: {type: count, size: 5}
          success_threshold: 0
          failure_rate_threshold: 120
        services:
          payment:
            upstream: ftp://nowhere
            timeout: 5
            routes:
              charges:
                match: {methods: [POST], path: charges}
                fallback: {type: static, file: ../../etc/passwd}
              bad: {match: {path_regex: "("}}
    """, {"CIRCUIT_BREAKER_TIMEOUT": "5s"})
    assert found == [
        "F:1: server.port: must be ≤ 65535, got 70000",
        "F:4: defaults.success_threshold: must be ≥ 1, got 0",
        "F:5: defaults.failure_rate_threshold: must be ≤ 100, got 120",
        "env CIRCUIT_BREAKER_TIMEOUT: defaults.open_timeout_ms: not an integer: '5s'",
        "F:3: defaults.window.size: 5 is smaller than minimum_calls (10)",
        "F:9: services.payment.timeout: unknown key (did you mean timeout_ms?)",
        "F:8: services.payment.upstream: not an http(s) URL with a host: 'ftp://nowhere'",
        "F:12: services.payment.routes.charges.match.path: must start with '/': 'charges'",
        f"F:13: services.payment.routes.charges.fallback.file: '../../etc/passwd' resolves outside "
        f"{tmp_path / 'fallback_responses'}",
        "F:14: services.payment.routes.bad.match.path_regex: not a valid regular expression: "
        "missing ), unterminated subpattern at position 0",
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("services: {a: {upstream: 'http://h:1', routes: {r: {windw: {}}}}}\n",
     "F:1: services.a.routes.r.windw: unknown key (did you mean window?)"),
    ("services:\n  a: {upstream: 'http://h:1', window: {type: time, size: 3}}\n",
     "F:2: services.a.window.size: not used by a time window"),
    ("services:\n  a: {upstream: 'http://h:1', minimum_calls: 50}\n",
     "F:2: services.a.minimum_calls: 50 is larger than the window size (20)"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {fallback: {type: carrier-pigeon}}}\n",
     "F:4: services.a.routes.r.fallback.type: must be one of static, cache, queue, table, got 'carrier-pigeon'"),
    ("services:\n  a: {upstream: 'http://h:1', failure_statuses: [500, 700]}\n",
     "F:2: services.a.failure_statuses: must be ≤ 599, got 700"),
    ("services:\n  metrics: {upstream: 'http://h:1'}\n",
     "F:2: services.metrics: service names use lowercase letters, digits, '-' and '_' and must not be a "
     "reserved path (status, metrics, healthz, admin)"),
    ("services:\n  a: {upstream: 'http://h:1', upstream: 'http://h:2'}\n",
     "F:2: services.a.upstream: duplicate key"),
    ("services:\n  a: {routes: {}}\n", "F:2: services.a.upstream: required"),
    ("services: [a, b]\n", "F:1: services: must be a mapping"),
    ("server: {port: 1}\nservices: {a: {upstream: 'http://h:1'}\n", "F:3: yaml: expected ',' or '}', but got '<stream end>'"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {q: {fallback: {type: queue, floor_limit: 10}}}\n",
     "F:4: services.a.routes.q.fallback.floor_limit: needs amount_field (the JSON field holding the amount)"),
    ("services:\n  a: !!python/object:os.system {upstream: x}\n",
     "F:2: services.a: unsupported YAML tag tag:yaml.org,2002:python/object:os.system"),
    ("services:\n  a: {upstream: !!python/name:os.system ''}\n",
     "F:2: services.a.upstream: cannot read value: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/name:os.system'"),
])
def test_single_problem_messages(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_unreadable_file_is_one_message(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing, {})
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]


def test_parse_without_file_has_no_fallback_dir():
    settings = parse_settings("services: {a: {upstream: 'http://127.0.0.1:9'}}", source="<text>", environ={})
    assert settings.fallback_dir is None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_check_command_exit_codes(tmp_path):
    ok = run_cli("check", "config/breakers.yaml")
    assert (ok.returncode, ok.stdout) == (0, "config/breakers.yaml: ok (4 services, 8 breakers)\n")
    bad = write(tmp_path, "services:\n  a: {upstream: 'http://h:1', success_threshold: 0}\n")
    result = run_cli("check", str(bad))
    assert result.returncode == 2
    assert result.stderr == f"{bad}:2: services.a.success_threshold: must be ≥ 1, got 0\n"


def test_run_refuses_invalid_config_with_the_same_messages(tmp_path):
    bad = write(tmp_path, "services:\n  a: {upstream: 'http://h:1', success_threshold: 0}\n")
    result = run_cli("run", "--config", str(bad), "--port", "0")
    assert result.returncode == 2
    assert result.stderr == f"{bad}:2: services.a.success_threshold: must be ≥ 1, got 0\n"
    missing = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert (missing.returncode, missing.stderr) == (
        2, f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory\n")
