"""What each config key means: its JSON type, description and an example, by where it is written.

The one source of docs/configuration.md and config/breakers.schema.json
(`python -m proxy.config.reference` writes both). Defaults are not written here: the reference
reads them from the model the loader builds (`model.py`, and the fallback checks), and a test
checks that these sections name exactly the keys the loader accepts (`load.ACCEPTED_KEYS`).

Pure data: no file access, no YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Schema = dict[str, Any]


def INT(minimum: int | None = None, maximum: int | None = None) -> Schema:
    return {"type": "integer", **_bounds(minimum, maximum)}


def NUM(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
        below: float | None = None) -> Schema:
    schema: Schema = {"type": "number", **_bounds(minimum, maximum)}
    if above is not None:
        schema["exclusiveMinimum"] = above
    if below is not None:
        schema["exclusiveMaximum"] = below
    return schema


def _bounds(minimum: float | None, maximum: float | None) -> Schema:
    return {k: v for k, v in (("minimum", minimum), ("maximum", maximum)) if v is not None}


def ENUM(*values: str) -> Schema:
    return {"enum": list(values)}


def LIST(item: Schema) -> Schema:
    return {"type": "array", "items": item, "minItems": 1}


def NULLABLE(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


STR: Schema = {"type": "string", "minLength": 1}
BOOL: Schema = {"type": "boolean"}
STATUS: Schema = INT(100, 599)
OBJECT: Schema = {"type": "object"}  # a mapping described by a section of its own
METHOD_NAMES = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    schema: Schema
    text: str
    example: str  # a YAML value
    ref: str | None = None  # the section describing this mapping-valued key


@dataclass(frozen=True, slots=True)
class Section:
    id: str  # as in load.ACCEPTED_KEYS
    title: str
    where: str  # how it is written in the file
    text: str
    keys: tuple[Key, ...]


TOP = Section("", "Top level", "", "The file is one mapping of these sections; only `services` is required.", (
    Key("server", OBJECT, "The listener and its connection limits.", "{port: 8080}", "server"),
    Key("storage", OBJECT, "Where state, snapshots, logs and queues are kept.", "{path: var/circuit-proxy.db}",
        "storage"),
    Key("admin", OBJECT, "The admin API's token.", "{token_env: CIRCUIT_PROXY_ADMIN_TOKEN}", "admin"),
    Key("cluster", OBJECT, "A fleet of proxies sharing breakers through PostgreSQL.", "{share_breakers: false}",
        "cluster"),
    Key("alerts", OBJECT, "Webhooks told about transitions.", "{webhooks: []}", "alerts"),
    Key("defaults", OBJECT, "Breaker and call settings every route inherits.", "{failure_threshold: 5}",
        "defaults"),
    Key("services", OBJECT, "The upstreams, each mounted at `/<service>/`; at least one.",
        "{payment: {upstream: 'http://127.0.0.1:9101'}}", "services.<service>"),
))

SERVER = Section("server", "server", "server:", "Read at start; a reload that changes `host`, `port`, `access_log` "
                 "or `log_format` logs that it takes effect at the next restart.", (
    Key("host", STR, "Address to listen on (`run --host` overrides it).", "127.0.0.1"),
    Key("port", INT(0, 65535), "Port to listen on (`run --port` overrides it; 0: any free port).", "8080"),
    Key("max_body_bytes", INT(1), "Largest request body; a longer one is answered 413 and its connection closed.",
        "10485760"),
    Key("max_header_bytes", INT(256), "Largest request header (or trailer) section; past it 431.", "16384"),
    Key("drain_timeout_s", NUM(0), "How long SIGTERM/SIGINT waits for in-flight requests.", "10"),
    Key("header_timeout_ms", INT(1), "A request head must be complete this soon after its first byte (else 408).",
        "10000"),
    Key("body_timeout_ms", INT(1), "A request body may pause this long (else 408, connection closed).", "30000"),
    Key("idle_timeout_ms", INT(1), "An idle keep-alive connection is closed after this.", "75000"),
    Key("max_connections", INT(1), "Client connections open at once; one more is closed at once. Lowered at "
        "start to fit the open-file limit.", "10000"),
    Key("upstream_max_connections", INT(0), "Connections open at once to each upstream (0 = no bound). A "
        "call that finds them all busy waits, first come first served, for one to be given back; "
        "the route's `timeout_ms` covers the wait (a call still waiting then is a timeout). With "
        "hundreds of client connections a bound (64 in PERFORMANCE.md) halves the CPU per request "
        "and the p99; but the routes of one upstream share it, so calls hanging on one route can "
        "make another's wait.", "64"),
    Key("access_log", BOOL, "Log each request.", "false"),
    Key("log_format", ENUM("text", "json"), "`text` (key=value) or `json` (JSON lines).", "text"),
    Key("trusted_proxies", NULLABLE({"type": "array", "items": {"type": "string", "minLength": 1}}),
        "IPv4/IPv6 networks (CIDR) of proxies in front. Not set: every client's `X-Forwarded-For` is appended "
        "to. Set: only a client connecting from one of these is; any other's `X-Forwarded-For/-Host/-Proto` "
        "are replaced by what the proxy saw.", "[10.0.0.0/8]"),
))

STORAGE = Section("storage", "storage", "storage:", "SQLite by default; PostgreSQL with `url` or `url_env`, which "
                  "also lets a fleet share state (see `cluster`).", (
    Key("path", STR, "The SQLite file (its folder is made). Read at start only.", "var/circuit-proxy.db"),
    Key("url", {"type": "string", "pattern": "^postgres(ql)?://"},
        "A PostgreSQL URL (`postgresql://user:pass@host:5432/db`) instead of `path`: every table and the queues "
        "go there.", "postgresql://proxy@db.shop.internal:5432/shop"),
    Key("url_env", STR, "The environment variable holding that URL (so a password can come from a secret); "
        "not with `url`.", "CIRCUIT_PROXY_DATABASE_URL"),
    Key("snapshot_interval_s", NUM(0.1), "Period of the `circuit_breaker_metrics` snapshots.", "10"),
    Key("retention_hours", NUM(0.01), "How long snapshots and fallback logs are kept.", "24"),
))

ADMIN = Section("admin", "admin", "admin:", "The admin API (`POST /admin/...`) needs `Authorization: Bearer <token>`.", (
    Key("token_env", STR, "The environment variable holding the token; when it is unset the proxy makes a random "
        "one and logs it once (`admin token: ...`).", "CIRCUIT_PROXY_ADMIN_TOKEN"),
))

CLUSTER = Section("cluster", "cluster", "cluster:", "A fleet of proxies sharing breakers through the PostgreSQL "
                  "storage: each decides on its own hot path; when `quorum` of them have a breaker open, every "
                  "one opens it, with the same `retry_at`, and admin actions apply to the whole fleet.", (
    Key("share_breakers", BOOL, "Share breaker state with the fleet; needs `storage.url` or `storage.url_env`.",
        "true"),
    Key("quorum", INT(1), "How many proxies must have a breaker open before the whole fleet opens it.", "2"),
    Key("node_id", STR, "This proxy's name in the fleet (default: host name and process id).", "pod-a"),
))

ALERTS = Section("alerts", "alerts", "alerts:", "Transitions are always logged; webhooks are optional.", (
    Key("webhooks", {"type": "array", "items": {"$ref": "#/definitions/webhook"}},
        "Each gets a POST of `{breaker, from_state, to_state, at, reason, text, status, alerts, ...}` for the "
        "events it names, in order, retried with backoff.", "[{url: 'http://127.0.0.1:9093/hook'}]",
        "alerts.webhooks[]"),
))

WEBHOOK = Section("alerts.webhooks[]", "alerts.webhooks[]", "alerts: {webhooks: [...]}", "One webhook.", (
    Key("url", {"type": "string", "pattern": "^[hH][tT][tT][pP][sS]?://"}, "Where to POST (http or https; required).",
        "http://127.0.0.1:9093/hook"),
    Key("events", LIST(ENUM("open", "close", "half_open", "forced_open", "forced_closed", "disabled")),
        "The transitions it is told about.", "[open, close, forced_open]"),
))

POLICY = Section("defaults", "Breaker and call settings", "",
                 "Written under `defaults`, on a service (for all its routes), or on a route. A route takes "
                 "each from the first level that sets it: route, service, environment variable (three of "
                 "them have one), `defaults`, built-in default.", (
    Key("failure_threshold", INT(0), "Consecutive failures that open the breaker (0 = off).", "5"),
    Key("success_threshold", INT(1), "Consecutive half-open successes that close it.", "3"),
    Key("open_timeout_ms", INT(1), "How long `open` rejects calls before going half-open.", "60000"),
    Key("max_open_timeout_ms", INT(1), "Cap of the open period as it grows by `backoff_multiplier` on each "
        "re-open. Not written: at least `open_timeout_ms`; written smaller than it: an error.", "300000"),
    Key("backoff_multiplier", NUM(1), "Growth of the open period on each re-open (1.0 = none).", "2.0"),
    Key("jitter", NUM(0, below=1), "The open period is multiplied by a random factor in [1 - jitter, 1].", "0.1"),
    Key("half_open_max_calls", INT(1), "Trial calls let through at once while half-open.", "1"),
    Key("window", {"type": ["object", "null"]}, "The sliding window of the rates.", "{type: count, size: 20}",
        "window"),
    Key("minimum_calls", INT(1), "Calls in the window before a rate counts (and is shown).", "10"),
    Key("failure_rate_threshold", NUM(0, 100), "Failure rate (percent) over the window that opens (0 = off).", "50"),
    Key("slow_call_duration_ms", {"anyOf": [INT(1), {"const": "auto"}]},
        "A call at least this long is slow, counted the moment it crosses. `auto`: learned, "
        "`auto_slow_factor` × the p99 of recent successes, between `auto_slow_floor_ms` and `timeout_ms` "
        "(`timeout_ms` until 100 calls were seen).", "auto"),
    Key("auto_slow_factor", NUM(above=1), "With `auto`: the threshold's multiple of the p99.", "4"),
    Key("auto_slow_floor_ms", INT(1), "With `auto`: the lowest threshold; not above `timeout_ms`.", "10"),
    Key("max_slow_in_flight", INT(0), "This many calls in flight past the slow threshold at once open the "
        "breaker (reason `slow_in_flight`); 0 = off.", "5"),
    Key("slow_call_rate_threshold", NUM(0, 100), "Slow-call rate (percent) over the window that opens (0 = off).",
        "100"),
    Key("failure_statuses", LIST(STATUS), "Upstream statuses that count as failures (4xx never should).",
        "[500, 502, 503, 504]"),
    Key("timeout_ms", INT(1), "The whole upstream call; past it, a failure (504, or the fallback).", "5000"),
    Key("connect_timeout_ms", INT(1), "Connecting to the upstream.", "1000"),
    Key("max_concurrent", INT(0), "Bulkhead: calls in flight at once; more are rejected at once (fallback or "
        "503), not counted as failures. 0 = unlimited.", "100"),
    Key("retry", {"type": ["object", "null"]}, "Retries of failed idempotent calls; merged key by key over the "
        "wider levels' `retry`.", "{attempts: 2, backoff_ms: 25}", "retry"),
    Key("probe", {"anyOf": [{"type": "object"}, {"type": "null"}]}, "The proxy's own half-open trial calls, so "
        "customers never are the trial. Replaces a wider level's as a whole; `null` turns an inherited one off.",
        "{path: /healthz, interval_ms: 1000}", "probe"),
))

WINDOW = Section("window", "window", "window:", "Count-based (the last `size` calls) or time-based (the last "
                 "`seconds`, in one-second buckets); write only the key of its type.", (
    Key("type", ENUM("count", "time"), "`count` or `time`.", "count"),
    Key("size", INT(1, 100_000), "Calls in a count window (default 20; not smaller than `minimum_calls`).", "20"),
    Key("seconds", INT(1, 3600), "Seconds in a time window (default 30).", "30"),
))

RETRY = Section("retry", "retry", "retry:", "A failed attempt (refused, reset, timeout, or a status in "
                "`failure_statuses`) is retried when the method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE) "
                "or the request has an `Idempotency-Key`, and only before any byte reached the client. Each "
                "attempt is a breaker call with its own permit and its own `timeout_ms` (a timeout is "
                "retryable), so a retried request may take up to (1 + `attempts`) × `timeout_ms` plus the "
                "backoffs: keep `attempts` small where a client waits.", (
    Key("attempts", INT(0, 10), "Extra attempts after the first (0 = off).", "2"),
    Key("backoff_ms", INT(0), "Before retry n, wait uniform(0, backoff_ms × 2^(n-1)) ms.", "25"),
    Key("budget_percent", NUM(0, 100), "Retries over the last 10 s stay within this share of the route's "
        "requests (at least one a second).", "20"),
    Key("max_body_bytes", INT(0), "Request bodies held for a retry up to this size; larger or chunked ones "
        "are not retried.", "65536"),
))

PROBE = Section("probe", "probe", "probe:", "Once the open period ends, the proxy sends these trials itself, one "
                "at a time, with `User-Agent: circuit-proxy-probe` and `X-Circuit-Probe: <breaker>`; customers "
                "get the fallback until `success_threshold` probes succeeded.", (
    Key("path", {"type": "string", "pattern": "^/"}, "The upstream path (after its base path) to call; required.",
        "/healthz"),
    Key("method", {"type": "string", "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"}, "The method.", "GET"),
    Key("interval_ms", INT(10), "Between probes (and after a failed one).", "1000"),
    Key("expect_status", {"anyOf": [STATUS, LIST(STATUS)]}, "Statuses that count as a success.", "[200, 204]"),
))

SERVICE = Section("services.<service>", "services.<name>", "services: {<name>: ...}",
                  "A service is mounted at `/<name>/` (lowercase letters, digits, `-`, `_`; not `status`, "
                  "`metrics`, `healthz` or `admin`). Any key of [Breaker and call settings](#breaker-and-call-"
                  "settings) may be written here too, for all its routes.", (
    Key("upstream", {"type": "string", "pattern": "^[hH][tT][tT][pP][sS]?://"}, "`http(s)://host:port[/base-path]`; "
        "required. A request to `/<name>/x?q` goes to `<upstream>/x?q`.", "http://127.0.0.1:9101"),
    Key("tls", {"type": ["object", "null"]}, "How to trust an `https` upstream (an error on `http`).",
        "{ca_file: certs/shop-ca.pem}", "tls"),
    Key("routes", {"type": ["object", "null"]}, "Named routes, matched in order; `default` (last, implicit when "
        "not written) takes the rest. The breaker of a route is `<service>.<route>`.",
        "{charges: {match: {methods: [POST], path: /charges}}}", "routes.<route>"),
))

TLS = Section("tls", "tls", "services: {<name>: {tls: ...}}", "Relative files are read from the config file's "
              "folder and must exist when the config is checked. Without `tls`, the system CAs are used and "
              "verification is on.", (
    Key("ca_file", NULLABLE(STR), "A PEM bundle of the CAs to trust (only these).", "certs/shop-ca.pem"),
    Key("client_cert", NULLABLE(STR), "PEM chain presented for mutual TLS (may hold the key too).",
        "certs/proxy.pem"),
    Key("client_key", NULLABLE(STR), "Its unencrypted key; needs `client_cert`.", "certs/proxy-key.pem"),
    Key("verify", BOOL, "`false` turns off certificate and host-name checks (testing only; logged).", "true"),
))

ROUTE = Section("routes.<route>", "routes.<name>", "services: {<name>: {routes: {<name>: ...}}}",
                "A route names its breaker, bulkhead and fallback. Any key of [Breaker and call settings]"
                "(#breaker-and-call-settings) may be written here too.", (
    Key("match", {"type": ["object", "null"]}, "Which requests it takes (not on `default`).",
        "{methods: [POST], path: /charges}", "match"),
    Key("fallback", {"type": "object"}, "What answers when the breaker rejects a call or a let-through call "
        "gets no response.", "{type: queue}", "fallback"),
))

MATCH = Section("match", "match", "match:", "Every condition written must hold.", (
    Key("methods", LIST({"type": "string"}), "Methods (any case); not written: any method.", "[GET, HEAD]"),
    Key("path", {"type": "string", "pattern": "^/"}, "A path-segment prefix under the mount (`/charges` matches "
        "`/charges` and `/charges/ch_1`, not `/chargesX`).", "/charges"),
    Key("path_regex", STR, "A full-match regular expression of the path instead of `path`.",
        "/stock/SKU-[0-9]+"),
))

FALLBACK = Section("fallback", "fallback", "fallback:", "Every fallback answer carries `X-Circuit-Breaker`, "
                   "`X-Circuit-State` and `X-Fallback` and is logged in `fallback_logs`. The other keys depend "
                   "on the type, below.", (
    Key("type", ENUM("static", "cache", "queue", "table"), "Which fallback; required.", "cache"),
    Key("on_failure", BOOL, "Also answer when a call let through gets no response (refused, reset, timeout), "
        "not only when the breaker rejects it.", "true"),
))

STATIC = Section("fallback: static", "fallback: static", "fallback: {type: static, ...}",
                 "A canned response from `fallback_responses/` (beside the config's folder).", (
    Key("file", STR, "The response file's name in `fallback_responses/` (required; not outside it).",
        "payments-busy.json"),
    Key("status", {"anyOf": [STATUS, {"type": "null"}]}, "Overrides the file's status.", "503"),
))

CACHE = Section("fallback: cache", "fallback: cache", "fallback: {type: cache, ...}",
                "The last-known-good 2xx answer for the same method, path and query, with `Age` and "
                "`X-Fallback-Estimated: true`.", (
    Key("max_age_s", NUM(0.001), "Older entries are not served.", "3600"),
    Key("max_entries", INT(1), "Entries kept at most.", "10000"),
    Key("max_body_bytes", INT(1), "Answers larger than this are not cached.", "1048576"),
    Key("max_bytes", INT(1), "All entries' bodies together.", "67108864"),
    Key("scale", {"type": "object", "additionalProperties": NUM(0)}, "Top-level numeric JSON fields multiplied "
        "by their factor and floored (estimated availability).", "{available: 0.5}"),
    Key("default_file", STR, "A response file served when nothing fresh enough is cached (else 503).",
        "inventory-unknown.json"),
))

QUEUE = Section("fallback: queue", "fallback: queue", "fallback: {type: queue, ...}",
                "Store and forward: written durably before `202 Accepted` (`X-Queue-Id`, `Idempotency-Key`), "
                "replayed in order once the upstream is healthy.", (
    Key("max_depth", INT(1), "Requests waiting at most; one more gets 503 `queue_full`.", "10000"),
    Key("max_attempts", INT(1), "Replays before a request becomes a dead letter (a 4xx at once).", "8"),
    Key("max_body_bytes", INT(1), "Largest body queued.", "1048576"),
    Key("amount_field", STR, "The top-level JSON field holding a request's amount (for the two limits).",
        "amount"),
    Key("floor_limit", NUM(0), "A request whose amount exceeds this gets 503 `offline_limit`; needs "
        "`amount_field`.", "100"),
    Key("exposure_cap", NUM(0), "The sum of queued amounts never goes past this (503 `offline_limit`); needs "
        "`amount_field`.", "5000"),
    Key("retry_base_ms", INT(1), "First wait after a failed replay; later waits grow up to `retry_max_ms`.", "500"),
    Key("retry_max_ms", INT(1), "Longest wait between replays (not below `retry_base_ms`).", "60000"),
    Key("replay_timeout_ms", INT(1), "Timeout of one replay (default: the route's `timeout_ms`).", "3000"),
))

TABLE = Section("fallback: table", "fallback: table", "fallback: {type: table, ...}",
                "A computed answer `{carrier, cost, currency, eta_days}` from a table: the request's `key` "
                "picks a zone, the zone a row; cost = `cost` + `per_kg` × weight.", (
    Key("key", STR, "Dotted path of the request JSON field that picks the zone.", "destination.country"),
    Key("weight_field", STR, "Dotted path of the weight for `per_kg`.", "weight_kg"),
    Key("zones", {"type": "object", "additionalProperties": {"type": "string"}}, "Field value → row name. Quote "
        "country codes YAML reads as booleans (`\"NO\": europe`).", "{IT: domestic, \"NO\": europe}"),
    Key("rows", {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/definitions/table_row"}},
        "Row name → `{cost, per_kg, currency, eta_days, carrier}` (`cost` required); required.",
        "{domestic: {cost: 6.90, per_kg: 0.50, currency: EUR, eta_days: 3}}"),
    Key("default_row", STR, "The row used when no zone matches; required.", "domestic"),
    Key("status", INT(200, 299), "The answer's status.", "200"),
))

SECTIONS: tuple[Section, ...] = (TOP, SERVER, STORAGE, ADMIN, CLUSTER, ALERTS, WEBHOOK, POLICY, WINDOW, RETRY,
                                 PROBE, SERVICE, TLS, ROUTE, MATCH, FALLBACK, STATIC, CACHE, QUEUE, TABLE)
BY_ID = {section.id: section for section in SECTIONS}
