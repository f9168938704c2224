"""Policy layering for the config loader: the policy keys set at each level, merged into a `Policy`.

Levels, lowest first: `defaults`, the environment overrides (`ENV_OVERRIDES`), the service,
the route (§1a). Each `Layer` remembers the node (or environment variable) that set each
value, so a conflict between two keys names the one written at the more specific level.

How the two mapping-valued keys of §3b inherit:
- `retry` merges key by key: a route writing `retry: {attempts: 2}` keeps the `backoff_ms`,
  `budget_percent` and `max_body_bytes` of its service, `defaults` or the built-in values,
  as if each were a policy key of its own. `retry: null` (or `{}`) changes nothing.
- `probe` is one unit and replaces whatever a wider level set: its keys describe one request
  (a `path` without its `method` and `expect_status` would probe the wrong thing), and
  `probe: null` turns off a probe inherited from the service or `defaults`.

Pure: no file access; the environment is handed in by the loader, which owns `os.environ`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from proxy.config.model import POLICY_KEYS, Policy, ProbeSpec, RetryPolicy, WindowSpec
from proxy.config.nodes import (
    MISSING, Ctx, is_null, join, mapping, scalar, section_values, unknown_keys,
)
from proxy.config.values import (
    AUTO, POLICY_VALUES, PROBE_VALUES, RETRY_VALUES, Invalid, choice, integer,
)

WINDOW_KEYS = ("type", "size", "seconds")

ENV_OVERRIDES: dict[str, str] = {
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "failure_threshold",
    "CIRCUIT_BREAKER_TIMEOUT": "open_timeout_ms",
    "CIRCUIT_BREAKER_SUCCESS_THRESHOLD": "success_threshold",
}


@dataclass(slots=True)
class Layer:
    """Policy values set at one level, with where each was set (for cross-key errors)."""

    values: dict[str, Any]
    nodes: dict[str, tuple[yaml.Node | None, str]]


def policy_layer(ctx: Ctx, entries: Mapping[str, tuple[yaml.Node, yaml.Node]], path: str) -> Layer:
    layer = Layer({}, {})
    for key in POLICY_KEYS:
        if key not in entries:
            continue
        key_node, value_node = entries[key]
        key_path = join(path, key)
        read_mapping = _MAPPING_KEYS.get(key)
        value = (read_mapping(ctx, value_node, key_path) if read_mapping is not None
                 else scalar(ctx, value_node, key_path, POLICY_VALUES[key]))
        if value is not MISSING:
            layer.values[key] = value
            layer.nodes[key] = (value_node, key_path)
    return layer


def _window(ctx: Ctx, node: yaml.Node, path: str) -> WindowSpec | object:
    entries = mapping(ctx, node, path)
    if entries is None:
        return MISSING
    unknown_keys(ctx, entries, WINDOW_KEYS, path)
    kind = "count"
    if "type" in entries:
        kind = scalar(ctx, entries["type"][1], f"{path}.type", choice("count", "time"))
        if kind is MISSING:
            return MISSING
    wrong = "seconds" if kind == "count" else "size"
    if wrong in entries:
        ctx.report(entries[wrong][0], f"{path}.{wrong}", f"not used by a {kind} window")
        return MISSING
    amount_key, default, maximum = ("size", 20, 100_000) if kind == "count" else ("seconds", 30, 3600)
    amount = default
    if amount_key in entries:
        amount = scalar(ctx, entries[amount_key][1], f"{path}.{amount_key}", integer(1, maximum))
        if amount is MISSING:
            return MISSING
    if kind == "count":
        return WindowSpec(type="count", size=amount, seconds=None)
    return WindowSpec(type="time", size=None, seconds=amount)


def _retry(ctx: Ctx, node: yaml.Node, path: str) -> dict[str, Any] | object:
    """The `retry` keys written at one level: merged over the wider levels' by effective_policy."""
    before = len(ctx.problems)
    values = section_values(ctx, node, path, RETRY_VALUES)
    return MISSING if len(ctx.problems) > before else values


def _probe(ctx: Ctx, node: yaml.Node, path: str) -> ProbeSpec | None | object:
    if is_null(node):
        return None  # off, even when a wider level set one
    before = len(ctx.problems)
    values = section_values(ctx, node, path, PROBE_VALUES)
    if len(ctx.problems) > before:
        return MISSING
    if "path" not in values:
        ctx.report(node, join(path, "path"), "required (the upstream path to probe, e.g. /health)")
        return MISSING
    return ProbeSpec(**values)


_MAPPING_KEYS = {"window": _window, "retry": _retry, "probe": _probe}


def env_layer(ctx: Ctx, environ: Mapping[str, str]) -> Layer:
    layer = Layer({}, {})
    for name, key in ENV_OVERRIDES.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = POLICY_VALUES[key](int(raw.strip()))
        except ValueError:
            ctx.problems.append(f"env {name}: defaults.{key}: not an integer: {raw!r}")
            continue
        except Invalid as exc:
            ctx.problems.append(f"env {name}: defaults.{key}: {exc}")
            continue
        layer.values[key] = value
        layer.nodes[key] = (None, f"env {name}")
    return layer


def effective_policy(ctx: Ctx, layers: list[Layer]) -> Policy:
    """Merge layers (lowest first) and check the keys that constrain each other."""
    values: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    origin: dict[str, tuple[yaml.Node | None, str]] = {}
    for layer in layers:
        for key, value in layer.values.items():
            if key == "retry":
                retry.update(value)  # key by key (module docstring)
            else:
                values[key] = value
        origin.update(layer.nodes)
    if retry:
        values["retry"] = RetryPolicy(**retry)
    policy = replace(Policy(), **values)
    if "max_open_timeout_ms" not in values and policy.open_timeout_ms > policy.max_open_timeout_ms:
        # Only an explicit cap can conflict; an implicit one follows the open timeout.
        policy = replace(policy, max_open_timeout_ms=policy.open_timeout_ms)
    if policy.max_open_timeout_ms < policy.open_timeout_ms:
        node, path = origin["max_open_timeout_ms"]
        ctx.report(node, path, f"{policy.max_open_timeout_ms} is smaller than "
                               f"open_timeout_ms ({policy.open_timeout_ms})")
    if policy.window.type == "count" and policy.window.size < policy.minimum_calls:
        # Blame whichever of the two keys was written later (the more specific level).
        window_node, window_path = origin.get("window", (None, "defaults.window"))
        calls_node, calls_path = origin.get("minimum_calls", (None, "defaults.minimum_calls"))
        if window_node is not None and (calls_node is None or
                                        window_node.start_mark.line >= calls_node.start_mark.line):
            ctx.report(window_node, f"{window_path}.size", f"{policy.window.size} is smaller than "
                                                           f"minimum_calls ({policy.minimum_calls})")
        else:
            ctx.report(calls_node, calls_path, f"{policy.minimum_calls} is larger than the window "
                                               f"size ({policy.window.size})")
    if policy.slow_call_duration_ms == AUTO and policy.auto_slow_floor_ms > policy.timeout_ms:
        # §3a clamps the learned threshold between the two: a floor above the ceiling is a
        # mistake in one of them. Blame the floor when it was written, else the timeout.
        if "auto_slow_floor_ms" in origin:
            node, path = origin["auto_slow_floor_ms"]
            ctx.report(node, path, f"{policy.auto_slow_floor_ms} is larger than timeout_ms "
                                   f"({policy.timeout_ms})")
        else:
            node, path = origin["timeout_ms"]
            ctx.report(node, path, f"{policy.timeout_ms} is smaller than auto_slow_floor_ms "
                                   f"({policy.auto_slow_floor_ms})")
    return policy
