"""config_load: inheritance, environment overrides, and one precise message per problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.config.model import Match, Policy, ProbeSpec, RetryPolicy, TlsSettings, WindowSpec
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
        # By line, top to bottom; the environment's last.
        "F:1: server.port: must be ≤ 65535, got 70000",
        "F:3: defaults.window.size: 5 is smaller than minimum_calls (10)",
        "F:4: defaults.success_threshold: must be ≥ 1, got 0",
        "F:5: defaults.failure_rate_threshold: must be ≤ 100, got 120",
        "F:8: services.payment.upstream: not an http(s) URL with a host: 'ftp://nowhere'",
        "F:9: services.payment.timeout: unknown key (did you mean timeout_ms?)",
        "F:12: services.payment.routes.charges.match.path: must start with '/': 'charges'",
        f"F:13: services.payment.routes.charges.fallback.file: '../../etc/passwd' resolves outside "
        f"{tmp_path / 'fallback_responses'}",
        "F:14: services.payment.routes.bad.match.path_regex: not a valid regular expression: "
        "missing ), unterminated subpattern at position 0",
        "env CIRCUIT_BREAKER_TIMEOUT: defaults.open_timeout_ms: not an integer: '5s'",
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


# --- tls (§1a): files checked for existence only; `ssl` is http/tls.py's business -----------

def test_tls_files_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "config" / "certs").mkdir(parents=True)
    (tmp_path / "config" / "certs" / "ca.pem").write_text("pem")
    (tmp_path / "client.pem").write_text("pem")
    path = write(tmp_path, f"""\
        services:
          a: {{upstream: 'https://127.0.0.1:9443', tls: {{ca_file: certs/ca.pem}}}}
          b:
            upstream: https://shop.example
            tls: {{ca_file: null, client_cert: {tmp_path / 'client.pem'}, client_key: null, verify: false}}
          c: {{upstream: 'https://127.0.0.1:9443', tls: {{}}}}
          d: {{upstream: 'https://127.0.0.1:9443', tls: null}}
          e: {{upstream: 'https://127.0.0.1:9443'}}
    """)
    tls = {s.name: s.tls for s in load_settings(path, {}).services}
    assert tls == {
        "a": TlsSettings(ca_file=tmp_path / "config" / "certs" / "ca.pem", client_cert=None,
                         client_key=None, verify=True),
        "b": TlsSettings(ca_file=None, client_cert=tmp_path / "client.pem", client_key=None, verify=False),
        "c": TlsSettings(),  # written but empty: system CAs, verify on
        "d": None, "e": None,  # not written
    }


def test_every_tls_problem_with_line_and_key_path(tmp_path):
    (tmp_path / "config" / "folder.pem").mkdir(parents=True)
    (tmp_path / "config" / "key.pem").write_text("pem")
    found = problems(tmp_path, """\
        services:
          a:
            upstream: https://127.0.0.1:9443
            tls:
              ca_fle: ca.pem
              ca_file: missing.pem
              verify: "no"
          b:
            upstream: https://127.0.0.1:9443
            tls:
              client_cert: folder.pem
              client_key: key.pem
          c:
            upstream: https://127.0.0.1:9443
            tls: {client_key: key.pem, verify: 1}
          d:
            upstream: http://127.0.0.1:9101
            tls: {verify: true}
          e: {upstream: 'https://h:1', tls: [ca.pem]}
    """)
    config = tmp_path / "config"
    assert found == [
        "F:5: services.a.tls.ca_fle: unknown key (did you mean ca_file?)",
        f"F:6: services.a.tls.ca_file: no such file: {config / 'missing.pem'}",
        "F:7: services.a.tls.verify: not a boolean: 'no'",
        f"F:11: services.b.tls.client_cert: not a file: {config / 'folder.pem'}",
        "F:15: services.c.tls.verify: not a boolean: 1",
        "F:15: services.c.tls.client_key: needs client_cert",
        "F:18: services.d.tls: tls needs an https upstream, got 'http://127.0.0.1:9101'",
        "F:19: services.e.tls: must be a mapping",
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("services:\n  a: {upstream: 'https://h:1', tls: {ca_file: nope.pem}}\n",
     "F:2: services.a.tls.ca_file: no such file: {config}/nope.pem"),
    ("services:\n  a: {upstream: 'https://h:1', tls: {client_key: k.pem}}\n",
     "F:2: services.a.tls.client_key: needs client_cert"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    tls: {}\n",
     "F:4: services.a.tls: tls needs an https upstream, got 'http://h:1'"),
    ("services:\n  a: {upstream: 'https://h:1', tls: {verify: 'false'}}\n",
     "F:2: services.a.tls.verify: not a boolean: 'false'"),
    ("services:\n  a: {upstream: 'https://h:1', tls: {ca_file: 7}}\n",
     "F:2: services.a.tls.ca_file: not a non-empty string: 7"),
    ("services:\n  a: {upstream: 'https://h:1', tls: {sni: x}}\n",
     "F:2: services.a.tls.sni: unknown key"),
])
def test_single_tls_problem_messages(tmp_path, text, expected):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "k.pem").write_text("pem")
    assert problems(tmp_path, text) == [expected.format(config=tmp_path / "config")]


# --- §3a hang detection and §3b retries and probes --------------------------------------------

def policies(tmp_path: Path, text: str) -> dict[str, Policy]:
    settings = load_settings(write(tmp_path, text), {})
    return {r.breaker_name: r.policy for r in settings.routes()}


def test_hang_detection_keys_at_every_level(tmp_path):
    found = policies(tmp_path, """
        defaults: {slow_call_duration_ms: auto, auto_slow_factor: 1.5, auto_slow_floor_ms: 1}
        services:
          a:
            upstream: http://h:1
            max_slow_in_flight: 3
            routes:
              r: {slow_call_duration_ms: 1, max_slow_in_flight: 0, auto_slow_factor: 6}
          b: {upstream: 'http://h:2'}
    """)
    assert found["a.r"] == Policy(slow_call_duration_ms=1, auto_slow_factor=6.0, auto_slow_floor_ms=1,
                                  max_slow_in_flight=0)
    assert found["a.default"] == Policy(slow_call_duration_ms="auto", auto_slow_factor=1.5,
                                        auto_slow_floor_ms=1, max_slow_in_flight=3)
    assert found["b.default"].max_slow_in_flight == 0  # built-in: off
    assert Policy().slow_call_duration_ms == 2000


def test_retry_merges_key_by_key_over_service_and_defaults(tmp_path):
    found = policies(tmp_path, """
        defaults:
          retry: {attempts: 1, budget_percent: 10}
        services:
          a:
            upstream: http://h:1
            retry: {backoff_ms: 0, max_body_bytes: 0}
            routes:
              r: {retry: {attempts: 10}}
              s: {retry: null}
              t: {retry: {budget_percent: 100, attempts: 0}}
          b: {upstream: 'http://h:2'}
          c: {upstream: 'http://h:3', retry: {}}
    """)
    assert found["a.r"].retry == RetryPolicy(attempts=10, backoff_ms=0, budget_percent=10, max_body_bytes=0)
    assert found["a.s"].retry == found["a.default"].retry == RetryPolicy(
        attempts=1, backoff_ms=0, budget_percent=10, max_body_bytes=0)
    assert found["a.t"].retry == RetryPolicy(attempts=0, backoff_ms=0, budget_percent=100, max_body_bytes=0)
    assert found["b.default"].retry == found["c.default"].retry == RetryPolicy(attempts=1, budget_percent=10)
    assert Policy().retry == RetryPolicy(attempts=0, backoff_ms=25, budget_percent=20, max_body_bytes=65_536)


def test_probe_replaces_as_a_whole_and_null_turns_it_off(tmp_path):
    found = policies(tmp_path, """
        defaults:
          probe: {path: /health, interval_ms: 500}
        services:
          a:
            upstream: http://h:1
            routes:
              r: {probe: {path: '/ping?deep=1', method: HEAD, expect_status: [200, 204], interval_ms: 10}}
              s: {probe: null}
              t: {probe: {path: /, expect_status: 599}}
          b: {upstream: 'http://h:2', probe: null}
    """)
    assert found["a.r"].probe == ProbeSpec(path="/ping?deep=1", method="HEAD", interval_ms=10,
                                           expect_status=frozenset({200, 204}))
    assert found["a.s"].probe is None
    assert found["a.t"].probe == ProbeSpec(path="/", expect_status=frozenset({599}))  # no interval inherited
    assert found["a.default"].probe == ProbeSpec(path="/health", method="GET", interval_ms=500,
                                                 expect_status=frozenset({200}))
    assert found["b.default"].probe is None
    assert Policy().probe is None


def test_every_new_key_problem_with_line_and_key_path(tmp_path):
    found = problems(tmp_path, """\
        defaults:
          slow_call_duration_ms: 0
          auto_slow_factor: 1
          auto_slow_floor_ms: 0
          max_slow_in_flight: -1
          retry: {attempts: 11, backoff_ms: -1, budget_percent: 100.5, max_body_bytes: -1}
        services:
          a:
            upstream: http://h:1
            retry: {atempts: 1}
            probe: {path: health, method: "GE T", interval_ms: 9, expect_status: [200, 600]}
            routes:
              r: {probe: {method: GET}}
              s: {probe: /health}
              t: {retry: 3}
              u:
                probe:
                  path: /h
                  expect: 200
    """)
    assert found == [
        "F:2: defaults.slow_call_duration_ms: must be ≥ 1, got 0",
        "F:3: defaults.auto_slow_factor: must be > 1, got 1",
        "F:4: defaults.auto_slow_floor_ms: must be ≥ 1, got 0",
        "F:5: defaults.max_slow_in_flight: must be ≥ 0, got -1",
        "F:6: defaults.retry.attempts: must be ≤ 10, got 11",
        "F:6: defaults.retry.backoff_ms: must be ≥ 0, got -1",
        "F:6: defaults.retry.budget_percent: must be ≤ 100, got 100.5",
        "F:6: defaults.retry.max_body_bytes: must be ≥ 0, got -1",
        "F:10: services.a.retry.atempts: unknown key (did you mean attempts?)",
        "F:11: services.a.probe.path: must start with '/': 'health'",
        "F:11: services.a.probe.method: not an HTTP method (a token): 'GE T'",
        "F:11: services.a.probe.interval_ms: must be ≥ 10, got 9",
        "F:11: services.a.probe.expect_status: must be ≤ 599, got 600",
        "F:13: services.a.routes.r.probe.path: required (the upstream path to probe, e.g. /health)",
        "F:14: services.a.routes.s.probe: must be a mapping",
        "F:15: services.a.routes.t.retry: must be a mapping",
        "F:19: services.a.routes.u.probe.expect: unknown key (did you mean expect_status?)",
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: fast}\n",
     "F:2: services.a.slow_call_duration_ms: not an integer or 'auto': 'fast'"),
    ("services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: 1.5}\n",
     "F:2: services.a.slow_call_duration_ms: not an integer or 'auto': 1.5"),
    ("services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: true}\n",
     "F:2: services.a.slow_call_duration_ms: not an integer or 'auto': 'true' (YAML reads it as a boolean)"),
    ("services:\n  a: {upstream: 'http://h:1', auto_slow_factor: auto}\n",
     "F:2: services.a.auto_slow_factor: not a number: 'auto'"),
    ("services:\n  a: {upstream: 'http://h:1', auto_slow_floor_ms: 2.5}\n",
     "F:2: services.a.auto_slow_floor_ms: not an integer: 2.5"),
    ("services:\n  a: {upstream: 'http://h:1', max_slow_in_flight: many}\n",
     "F:2: services.a.max_slow_in_flight: not an integer: 'many'"),
    ("services:\n  a: {upstream: 'http://h:1', max_slow_in_fligth: 2}\n",
     "F:2: services.a.max_slow_in_fligth: unknown key (did you mean max_slow_in_flight?)"),
    ("defaults: {retries: {attempts: 1}}\nservices: {a: {upstream: 'http://h:1'}}\n",
     "F:1: defaults.retries: unknown key (did you mean retry?)"),
    ("services:\n  a: {upstream: 'http://h:1', retry: {budget_percent: -1}}\n",
     "F:2: services.a.retry.budget_percent: must be ≥ 0, got -1"),
    ("services:\n  a: {upstream: 'http://h:1', retry: {budget_percent: .nan}}\n",
     "F:2: services.a.retry.budget_percent: not a number: nan"),
    ("services:\n  a: {upstream: 'http://h:1', auto_slow_factor: .nan}\n",
     "F:2: services.a.auto_slow_factor: not a number: nan"),
    ("services:\n  a: {upstream: 'http://h:1', retry: {attempts: 1.0}}\n",
     "F:2: services.a.retry.attempts: not an integer: 1.0"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {}}\n",
     "F:2: services.a.probe.path: required (the upstream path to probe, e.g. /health)"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: '/a b'}}\n",
     "F:2: services.a.probe.path: must be printable ASCII without spaces or '#': '/a b'"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: '/a#b'}}\n",
     "F:2: services.a.probe.path: must be printable ASCII without spaces or '#': '/a#b'"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: '/a/../admin'}}\n",
     "F:2: services.a.probe.path: must not contain dot-segments: '/a/../admin'"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: /h, method: 7}}\n",
     "F:2: services.a.probe.method: not an HTTP method (a token): 7"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: /h, expect_status: 99}}\n",
     "F:2: services.a.probe.expect_status: must be ≥ 100, got 99"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: /h, expect_status: []}}\n",
     "F:2: services.a.probe.expect_status: not a non-empty list of status codes: []"),
    ("services:\n  a: {upstream: 'http://h:1', probe: {path: /h, interval_ms: '1s'}}\n",
     "F:2: services.a.probe.interval_ms: not an integer: '1s'"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    routes: {r: {probe: {path: /h, intervall_ms: 10}}}\n",
     "F:4: services.a.routes.r.probe.intervall_ms: unknown key (did you mean interval_ms?)"),
    ("services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: auto, timeout_ms: 5}\n",
     "F:2: services.a.timeout_ms: 5 is smaller than auto_slow_floor_ms (10)"),
    ("services:\n  a:\n    upstream: 'http://h:1'\n    slow_call_duration_ms: auto\n    auto_slow_floor_ms: 6000\n",
     "F:5: services.a.auto_slow_floor_ms: 6000 is larger than timeout_ms (5000)"),
])
def test_single_new_key_problem_messages(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


@pytest.mark.parametrize("text", [
    # both sides of each boundary: the valid side
    "services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: 1, auto_slow_floor_ms: 1}\n",
    "services:\n  a: {upstream: 'http://h:1', auto_slow_factor: 1.0001, max_slow_in_flight: 0}\n",
    "services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: auto, auto_slow_floor_ms: 5000}\n",
    "services:\n  a: {upstream: 'http://h:1', slow_call_duration_ms: 1, timeout_ms: 5}\n",  # floor unused
    "services:\n  a: {upstream: 'http://h:1', retry: {attempts: 10, backoff_ms: 0, budget_percent: 0}}\n",
    "services:\n  a: {upstream: 'http://h:1', retry: {budget_percent: 100, max_body_bytes: 0}}\n",
    "services:\n  a: {upstream: 'http://h:1', probe: {path: /, interval_ms: 10, expect_status: [100, 599]}}\n",
    "services:\n  a: {upstream: 'http://h:1', probe: {path: /h, method: M-SEARCH}}\n",
])
def test_new_keys_at_their_boundaries_are_valid(tmp_path, text):
    load_settings(write(tmp_path, text), {})


def test_env_overrides_leave_the_new_keys_alone(tmp_path):
    path = write(tmp_path, "services: {a: {upstream: 'http://h:1', slow_call_duration_ms: auto}}\n")
    policy = load_settings(path, {"CIRCUIT_BREAKER_TIMEOUT": "2500"}).services[0].routes[0].policy
    assert (policy.open_timeout_ms, policy.slow_call_duration_ms, policy.retry) == (2500, "auto", RetryPolicy())
