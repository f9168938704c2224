"""YAML + environment → Settings, or ConfigError listing every problem.

The only module that reads the config file and `os.environ`. It composes the document with
`yaml.SafeLoader` (no tags that build objects), walks the nodes with their key paths so each
problem names `file:line: key.path: message`, applies `defaults` → service → route
inheritance and the seed's environment overrides (the layering itself: `config/policy.py`),
and collects every problem before raising.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from proxy.config.model import (
    POLICY_KEYS,
    AdminSettings,
    ClusterSettings,
    FallbackSpec,
    Match,
    Route,
    ServerSettings,
    Service,
    Settings,
    StorageSettings,
)
from proxy.config.nodes import MISSING, Ctx, is_null, join, mapping, scalar, section_values, unknown_keys
from proxy.config.values import (
    PROBE_VALUES, RETRY_VALUES, boolean, choice, http_url, methods, path_prefix, regex,
)
from proxy.config.fallback_options import COMMON_KEYS, FALLBACK_TYPES, OPTIONS, validate_fallback_options
from proxy.config.sections import (
    ADMIN_SCHEMA, ALERTS_KEYS, CLUSTER_SCHEMA, SERVER_SCHEMA, STORAGE_SCHEMA, TLS_SCHEMA, WEBHOOK_KEYS,
    alerts as alert_settings,
    check_fleet, tls as tls_settings, trusted_proxies,
)
from proxy.config.policy import WINDOW_KEYS, Layer, effective_policy, env_layer, policy_layer

RESERVED_SERVICE_NAMES = frozenset({"status", "status.json", "metrics", "healthz", "admin"})
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(Exception):
    """Every problem found in a config, one human-readable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def by_line(problems: list[str], source: str) -> list[str]:
    """Problems in the order of the file's lines (a file-wide one first, the environment's
    last), each line's in the order found: a reader fixes them top to bottom."""
    prefix = f"{source}:"

    def line(problem: str) -> tuple[int, int]:
        if not problem.startswith(prefix):
            return (1, 0)  # `env NAME: ...`
        number = problem[len(prefix):].split(":", 1)[0]
        return (0, int(number)) if number.isdigit() else (0, 0)
    return sorted(problems, key=line)


# --- sections -----------------------------------------------------------------------------

_TOP_KEYS = ("server", "storage", "admin", "cluster", "alerts", "defaults", "services")
_SERVICE_KEYS = ("upstream", "tls", "routes", *POLICY_KEYS)
_ROUTE_KEYS = ("match", "fallback", *POLICY_KEYS)
_MATCH_KEYS = ("methods", "path", "path_regex")

# Every key the loader reads, by where it is written. docs/configuration.md and
# config/breakers.schema.json are generated from proxy/config/keys.py, and a test checks that
# those describe exactly these keys (so neither can drift from what the loader takes).
ACCEPTED_KEYS: dict[str, tuple[str, ...]] = {
    "": _TOP_KEYS,
    "server": tuple(SERVER_SCHEMA),
    "storage": tuple(STORAGE_SCHEMA),
    "admin": tuple(ADMIN_SCHEMA),
    "cluster": tuple(CLUSTER_SCHEMA),
    "alerts": ALERTS_KEYS,
    "alerts.webhooks[]": WEBHOOK_KEYS,
    "defaults": POLICY_KEYS,
    "window": WINDOW_KEYS,
    "retry": tuple(RETRY_VALUES),
    "probe": tuple(PROBE_VALUES),
    "services.<service>": _SERVICE_KEYS,
    "tls": tuple(TLS_SCHEMA),
    "routes.<route>": _ROUTE_KEYS,
    "match": _MATCH_KEYS,
    "fallback": COMMON_KEYS,
    **{f"fallback: {kind}": OPTIONS[kind] for kind in FALLBACK_TYPES},
}



def _match(ctx: Ctx, node: yaml.Node | None, path: str) -> Match:
    if node is None:
        return Match()
    entries = mapping(ctx, node, path)
    if entries is None:
        return Match()
    unknown_keys(ctx, entries, _MATCH_KEYS, path)
    allowed = None
    if "methods" in entries:
        allowed = scalar(ctx, entries["methods"][1], f"{path}.methods", methods)
        allowed = None if allowed is MISSING else allowed
    prefix = None
    if "path" in entries:
        prefix = scalar(ctx, entries["path"][1], f"{path}.path", path_prefix)
        prefix = None if prefix is MISSING else prefix
    pattern = None
    if "path_regex" in entries:
        pattern = scalar(ctx, entries["path_regex"][1], f"{path}.path_regex", regex)
        pattern = None if pattern is MISSING else pattern
    if prefix is not None and pattern is not None:
        ctx.report(entries["path_regex"][0], f"{path}.path_regex", "use either path or path_regex, not both")
    return Match(methods=allowed, path=prefix, path_regex=pattern)


def _fallback(ctx: Ctx, node: yaml.Node, path: str, fallback_dir: Path | None) -> FallbackSpec | None:
    entries = mapping(ctx, node, path)
    if entries is None:
        return None
    if "type" not in entries:
        ctx.report(node, f"{path}.type", f"required (one of {', '.join(FALLBACK_TYPES)})")
        return None
    kind = scalar(ctx, entries["type"][1], f"{path}.type", choice(*FALLBACK_TYPES))
    if kind is MISSING:
        return None
    on_failure = True
    if "on_failure" in entries:
        on_failure = scalar(ctx, entries["on_failure"][1], f"{path}.on_failure", boolean)
    options_nodes = {k: v for k, v in entries.items() if k not in ("type", "on_failure")}

    def report(key: str | None, message: str) -> None:
        where = options_nodes[key][1] if key in options_nodes else node
        ctx.report(where, join(path, key) if key else path, message)

    raw = {}
    for key, (_, value_node) in options_nodes.items():
        value = scalar(ctx, value_node, join(path, key), lambda v: v)
        if value is MISSING:
            return None
        raw[key] = value
    options = validate_fallback_options(kind, raw, fallback_dir, report)
    if options is None or on_failure is MISSING:
        return None
    return FallbackSpec(type=kind, on_failure=on_failure, options=options)



def _routes(ctx: Ctx, service: str, node: yaml.Node | None, path: str, policy_layers: list[Layer],
            fallback_dir: Path | None) -> tuple[Route, ...]:
    entries = mapping(ctx, node, path) if node is not None else {}
    if entries is None:
        return ()
    routes = []
    for name, (key_node, route_node) in entries.items():
        route_path = f"{path}.{name}"
        if not _ROUTE_NAME.fullmatch(name):
            ctx.report(key_node, route_path, "route names use letters, digits, '-' and '_'")
            continue
        route_entries = mapping(ctx, route_node, route_path)
        if route_entries is None:
            continue
        unknown_keys(ctx, route_entries, _ROUTE_KEYS, route_path)
        if name == "default" and "match" in route_entries:
            ctx.report(route_entries["match"][0], f"{route_path}.match",
                       "the default route matches everything; remove match")
        match = _match(ctx, route_entries.get("match", (None, None))[1], f"{route_path}.match")
        fallback = None
        if "fallback" in route_entries:
            fallback = _fallback(ctx, route_entries["fallback"][1], f"{route_path}.fallback", fallback_dir)
        layer = policy_layer(ctx, route_entries, route_path)
        policy = effective_policy(ctx, [*policy_layers, layer])
        route = Route(service=service, name=name, match=match if name != "default" else Match(),
                      policy=policy, fallback=fallback)
        routes.append(route)
    # The default route is always last, and present even when not written (§1a).
    routes.sort(key=lambda r: r.name == "default")
    if not routes or routes[-1].name != "default":
        routes.append(Route(service=service, name="default", match=Match(),
                            policy=effective_policy(ctx, policy_layers)))
    return tuple(routes)


def _services(ctx: Ctx, node: yaml.Node | None, base_layers: list[Layer],
              fallback_dir: Path | None, config_dir: Path) -> tuple[Service, ...]:
    if node is None:
        return ()
    entries = mapping(ctx, node, "services")
    if entries is None:
        return ()
    services = []
    for name, (key_node, service_node) in entries.items():
        path = f"services.{name}"
        if not _SERVICE_NAME.fullmatch(name) or name in RESERVED_SERVICE_NAMES:
            ctx.report(key_node, path, "service names use lowercase letters, digits, '-' and '_' "
                                       "and must not be a reserved path (status, metrics, healthz, admin)")
            continue
        service_entries = mapping(ctx, service_node, path)
        if service_entries is None:
            continue
        unknown_keys(ctx, service_entries, _SERVICE_KEYS, path)
        if "upstream" not in service_entries:
            ctx.report(service_node, f"{path}.upstream", "required")
            continue
        upstream = scalar(ctx, service_entries["upstream"][1], f"{path}.upstream", http_url)
        tls = None
        tls_key, tls_node = service_entries.get("tls", (None, None))
        if tls_node is not None and not is_null(tls_node):  # `tls: null` is as if not written
            tls = tls_settings(ctx, tls_node, f"{path}.tls", config_dir)
            if upstream is not MISSING and not upstream.lower().startswith("https://"):
                # Settings that cannot apply are a mistake, not something to ignore (§1a).
                ctx.report(tls_key, f"{path}.tls", f"tls needs an https upstream, got {upstream!r}")
        layers = [*base_layers, policy_layer(ctx, service_entries, path)]
        routes_node = service_entries.get("routes", (None, None))[1]
        routes = _routes(ctx, name, routes_node, f"{path}.routes", layers, fallback_dir)
        if upstream is not MISSING and tls is not MISSING:
            services.append(Service(name=name, upstream=upstream, routes=routes, tls=tls))
    return tuple(services)



def _build(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


# --- entry points -------------------------------------------------------------------------

def parse_settings(text: str, *, source: str, environ: Mapping[str, str] | None = None,
                   config_path: Path | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    loader = yaml.SafeLoader(text)
    ctx = Ctx(source=source, loader=loader, problems=[])
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{source}{line}: yaml: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: yaml: {exc}"]) from None
    finally:
        loader.dispose()
    if root is None:
        raise ConfigError([f"{source}: the file is empty"])
    entries = mapping(ctx, root, "")
    if entries is None:
        raise ConfigError(ctx.problems)
    unknown_keys(ctx, entries, _TOP_KEYS, "")

    def section(name: str) -> yaml.Node | None:
        return entries[name][1] if name in entries else None

    fallback_dir = config_path.resolve().parent.parent / "fallback_responses" if config_path else None
    server_values = section_values(ctx, section("server"), "server", SERVER_SCHEMA)
    server_values.pop("trusted_proxies", None)
    trusted = trusted_proxies(ctx, section("server"))
    if trusted is not MISSING:
        server_values["trusted_proxies"] = trusted
    server = _build(ServerSettings, server_values)
    storage_values = section_values(ctx, section("storage"), "storage", STORAGE_SCHEMA)
    storage = _build(StorageSettings, storage_values)
    cluster = _build(ClusterSettings, section_values(ctx, section("cluster"), "cluster", CLUSTER_SCHEMA))
    check_fleet(ctx, entries, storage, cluster)
    admin = _build(AdminSettings, section_values(ctx, section("admin"), "admin", ADMIN_SCHEMA))
    alerts = alert_settings(ctx, section("alerts"))
    defaults_layer = Layer({}, {})
    if section("defaults") is not None:
        defaults_entries = mapping(ctx, section("defaults"), "defaults")
        if defaults_entries is not None:
            unknown_keys(ctx, defaults_entries, POLICY_KEYS, "defaults")
            defaults_layer = policy_layer(ctx, defaults_entries, "defaults")
    # Precedence (§1a): route > service > environment > defaults > built-in.
    base_layers = [defaults_layer, env_layer(ctx, environ)]
    effective_policy(ctx, base_layers)
    config_dir = config_path.resolve().parent if config_path else Path.cwd()
    services = _services(ctx, section("services"), base_layers, fallback_dir, config_dir)
    if not entries.get("services") and not ctx.problems:
        ctx.report(root, "services", "required: at least one service")
    if ctx.problems:
        raise ConfigError(by_line(ctx.problems, source))
    return Settings(server=server, storage=storage, admin=admin, cluster=cluster, alerts=alerts,
                    services=services,
                    config_path=config_path, fallback_dir=fallback_dir)


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the config at `path`; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read: {reason}"]) from None
    return parse_settings(text, source=str(path), environ=environ, config_path=path)
