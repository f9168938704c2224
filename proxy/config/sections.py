"""The sections beside the services: server, storage, admin and cluster (flat mappings of
scalars), alerts, `server.trusted_proxies`, a service's `tls`, and the checks of the fleet keys.

Pure but for checking that the TLS files exist (not reading them: `check` stays free of `ssl`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from proxy.config.model import AlertSettings, ClusterSettings, StorageSettings, TlsSettings, Webhook
from proxy.config.nodes import MISSING, Ctx, is_null, join, mapping, scalar, section_values, unknown_keys
from proxy.config.values import (
    boolean, choice, events, file_name, http_url, integer, number, postgres_url, text,
)

SERVER_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "host": text,
    "port": integer(0, 65535),
    "max_body_bytes": integer(1),
    "max_header_bytes": integer(256),
    "drain_timeout_s": number(0.0),
    "header_timeout_ms": integer(1),
    "body_timeout_ms": integer(1),
    "idle_timeout_ms": integer(1),
    "max_connections": integer(1),
    "upstream_max_connections": integer(0),
    "access_log": boolean,
    "log_format": choice("text", "json"),
    "trusted_proxies": lambda value: value,  # checked entry by entry in trusted_proxies
}
STORAGE_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "path": text,
    "url": postgres_url,
    "url_env": text,
    "snapshot_interval_s": number(0.1),
    "retention_hours": number(0.01),
}
ADMIN_SCHEMA: dict[str, Callable[[Any], Any]] = {"token_env": text}
CLUSTER_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "share_breakers": boolean,
    "quorum": integer(1),
    "node_id": text,
}
TLS_FILES = ("ca_file", "client_cert", "client_key")
TLS_SCHEMA: dict[str, Callable[[Any], Any]] = {**dict.fromkeys(TLS_FILES, file_name), "verify": boolean}
ALERTS_KEYS = ("webhooks",)
WEBHOOK_KEYS = ("url", "events")


def alerts(ctx: Ctx, node: yaml.Node | None) -> AlertSettings:
    if node is None:
        return AlertSettings()
    entries = mapping(ctx, node, "alerts")
    if entries is None:
        return AlertSettings()
    unknown_keys(ctx, entries, ALERTS_KEYS, "alerts")
    if "webhooks" not in entries:
        return AlertSettings()
    hooks_node = entries["webhooks"][1]
    if not isinstance(hooks_node, yaml.SequenceNode):
        ctx.report(hooks_node, "alerts.webhooks", "must be a list")
        return AlertSettings()
    hooks = []
    for index, hook_node in enumerate(hooks_node.value):
        path = f"alerts.webhooks[{index}]"
        hook = mapping(ctx, hook_node, path)
        if hook is None:
            continue
        unknown_keys(ctx, hook, WEBHOOK_KEYS, path)
        if "url" not in hook:
            ctx.report(hook_node, f"{path}.url", "required")
            continue
        url = scalar(ctx, hook["url"][1], f"{path}.url", http_url)
        hook_events = frozenset({"open", "close"})
        if "events" in hook:
            hook_events = scalar(ctx, hook["events"][1], f"{path}.events", events)
        if url is not MISSING and hook_events is not MISSING:
            hooks.append(Webhook(url=url, events=hook_events))
    return AlertSettings(webhooks=tuple(hooks))


def trusted_proxies(ctx: Ctx, server_node: yaml.Node | None) -> tuple[str, ...] | object:
    """`server.trusted_proxies`: a list of IPv4/IPv6 networks (CIDR; a bare address is a /32 or
    /128, host bits are ignored), each problem reported on its own entry's line."""
    entries = mapping(ctx, server_node, "server") if server_node is not None else None
    if not entries or "trusted_proxies" not in entries:
        return MISSING
    node = entries["trusted_proxies"][1]
    path = "server.trusted_proxies"
    if is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        ctx.report(node, path, "must be a list of IP networks (CIDR), e.g. [10.0.0.0/8]")
        return MISSING
    networks: list[str] = []
    ok = True
    for index, item in enumerate(node.value):
        value = scalar(ctx, item, f"{path}[{index}]", text)
        if value is MISSING:
            ok = False
            continue
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            ctx.report(item, f"{path}[{index}]", f"not an IPv4 or IPv6 network (CIDR): {value!r}")
            ok = False
            continue
        if str(network) not in networks:
            networks.append(str(network))
    return tuple(networks) if ok else MISSING


def tls(ctx: Ctx, node: yaml.Node, path: str, config_dir: Path) -> TlsSettings | object:
    """A service's `tls` mapping (§1a). Files must exist but are not read: `check` stays
    free of `ssl`, and a bad PEM is reported by `http/tls.py` when the proxy starts."""
    before = len(ctx.problems)
    values = section_values(ctx, node, path, TLS_SCHEMA)
    entries = mapping(ctx, node, path) or {}  # again, for the lines of file problems
    for key in TLS_FILES:
        if values.get(key) is None:  # not written, or null: the default
            values.pop(key, None)
            continue
        # Relative to the config file, not the working directory, so `check` and `run`
        # started from anywhere find the same file.
        values[key] = file = config_dir / values[key]
        problem = _file_problem(file)
        if problem:
            ctx.report(entries[key][1], join(path, key), f"{problem}: {file}")
    if "client_key" in values and "client_cert" not in values:
        ctx.report(entries["client_key"][0], join(path, "client_key"), "needs client_cert")
    return MISSING if len(ctx.problems) > before else TlsSettings(**values)


def _file_problem(file: Path) -> str | None:
    try:
        return None if file.is_file() else "not a file" if file.exists() else "no such file"
    except OSError as exc:  # e.g. a folder on the way that we may not enter
        return f"cannot check ({exc.strerror})"


def check_fleet(ctx: Ctx, entries: dict[str, Any], storage: StorageSettings,
                cluster: ClusterSettings) -> None:
    """`storage.url` and `storage.url_env` name one database; sharing needs PostgreSQL (§8)."""
    if storage.url is not None and storage.url_env is not None:
        ctx.report(entries["storage"][1], "storage.url_env", "give either storage.url or storage.url_env, not both")
    if cluster.share_breakers and storage.url is None and storage.url_env is None:
        node = entries["cluster"][1]
        ctx.report(node, "cluster.share_breakers", "needs a PostgreSQL storage (storage.url or storage.url_env)")

