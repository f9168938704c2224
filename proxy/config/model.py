"""Frozen dataclasses describing a loaded configuration.

Field names are the YAML keys, units included (`open_timeout_ms`), so a key path in an error
message is the attribute path. Pure: no I/O here; `config_load` builds these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSpec:
    type: Literal["count", "time"] = "count"
    size: int | None = 20  # calls, for type "count"
    seconds: int | None = None  # for type "time"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """`retry` (§3b): extra attempts for a failed call, bounded by a budget."""

    attempts: int = 0  # extra attempts after the first; 0 = off
    backoff_ms: int = 25  # before retry n: uniform(0, backoff_ms × 2^(n-1)) ms ("full jitter")
    budget_percent: float = 20.0  # retries over 10 s ≤ this share of the route's requests
    max_body_bytes: int = 65_536  # request bodies held for a retry; larger ones are not retried


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSpec:
    """`probe`: the proxy's own half-open trial call, so customers are never the trial."""

    path: str  # on the upstream (after its base path), e.g. /health
    method: str = "GET"
    interval_ms: int = 1000  # between probes while half-open (and after a failed one)
    expect_status: frozenset[int] = frozenset({200})  # a probe succeeds only with one of these


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Every per-route breaker and call setting (the `defaults` keys of §1a)."""

    failure_threshold: int = 5
    success_threshold: int = 3
    open_timeout_ms: int = 60_000
    max_open_timeout_ms: int = 300_000
    backoff_multiplier: float = 2.0
    jitter: float = 0.0
    half_open_max_calls: int = 1
    window: WindowSpec = field(default_factory=WindowSpec)
    minimum_calls: int = 10
    failure_rate_threshold: float = 50.0
    slow_call_duration_ms: int | Literal["auto"] = 2000  # "auto": learned (§3a)
    auto_slow_factor: float = 4.0  # auto threshold = factor × p99 of recent successful calls
    auto_slow_floor_ms: int = 10  # ... never below this, nor above timeout_ms
    max_slow_in_flight: int = 0  # open (slow_in_flight) when this many calls are past the
                                 # slow threshold at once; 0 = off
    slow_call_rate_threshold: float = 100.0
    failure_statuses: frozenset[int] = frozenset({500, 502, 503, 504})
    timeout_ms: int = 5000
    connect_timeout_ms: int = 1000
    max_concurrent: int = 100
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    probe: ProbeSpec | None = None  # None: the next customer request is the half-open trial


POLICY_KEYS: tuple[str, ...] = tuple(Policy.__dataclass_fields__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    methods: frozenset[str] | None = None  # None: any method
    path: str | None = None  # path-segment prefix, relative to the service mount
    path_regex: str | None = None  # full-match regex


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackSpec:
    type: Literal["static", "cache", "queue", "table"]
    on_failure: bool = True  # also serve it when a let-through call gets no response
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    service: str
    name: str
    match: Match
    policy: Policy
    fallback: FallbackSpec | None = None

    @property
    def breaker_name(self) -> str:
        return f"{self.service}.{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """A service's `tls` keys (§1a), for an https upstream.

    Paths are absolute: the loader resolves relative ones against the config file's folder
    and has checked that each file exists; their contents are read only by `http/tls.py`.
    """

    ca_file: Path | None = None  # None: the system's CA store; else only this bundle is trusted
    client_cert: Path | None = None  # PEM chain for mutual TLS; may also hold the key
    client_key: Path | None = None  # only with client_cert
    verify: bool = True  # False: neither the chain nor the host name is checked


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    name: str
    upstream: str  # scheme://host:port[/base-path], no trailing slash
    routes: tuple[Route, ...]
    tls: TlsSettings | None = None  # None when `tls` is not written (an https upstream then
                                    # uses the system CAs with verification on, §1a)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    drain_timeout_s: float = 10.0
    # Connections (fixed, §1a): a head must be complete within header_timeout_ms of its first
    # byte, a body may pause at most body_timeout_ms (408 either way), an idle keep-alive
    # connection lives idle_timeout_ms, and at most max_connections are open at once.
    header_timeout_ms: int = 10_000
    body_timeout_ms: int = 30_000
    idle_timeout_ms: int = 75_000
    max_connections: int = 10_000
    # Connections open at once to each upstream URL (0: no bound); calls beyond wait, in order,
    # within their own timeout, for one to be given back.
    upstream_max_connections: int = 0
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"
    # Networks (CIDR, normalised) whose X-Forwarded-For/-Host/-Proto are believed: a client
    # connecting from one gets X-Forwarded-For appended to; any other's are dropped and
    # replaced by what the proxy saw. None (not written): every client is appended to, as §2
    # says; () (written empty): no client is trusted.
    trusted_proxies: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSettings:
    path: str = "var/circuit-proxy.db"
    # PostgreSQL instead of SQLite (§8): written in the file, or read from the environment
    # variable named by url_env (so a password can come from a Kubernetes Secret).
    url: str | None = None
    url_env: str | None = None
    snapshot_interval_s: float = 10.0
    retention_hours: float = 24.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """A fleet of proxies sharing breaker state through the PostgreSQL storage (§8)."""
    share_breakers: bool = False
    quorum: int = 1
    node_id: str | None = None  # default: host name + process id


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    token_env: str = "CIRCUIT_PROXY_ADMIN_TOKEN"


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    url: str
    events: frozenset[str] = frozenset({"open", "close"})


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertSettings:
    webhooks: tuple[Webhook, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    services: tuple[Service, ...] = ()
    config_path: Path | None = None
    fallback_dir: Path | None = None  # <config dir>/../fallback_responses

    def routes(self) -> list[Route]:
        return [route for service in self.services for route in service.routes]
