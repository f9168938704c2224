"""docs/configuration.md and config/breakers.schema.json, generated from one source.

`python -m proxy.config.reference` rewrites both; `--check` exits 1 when either is stale. The
descriptions and JSON types come from `keys.py`, every default from what the loader builds
(the model's dataclasses, and the fallback checks run on a minimal mapping), so a default
changed in the code changes the reference. tests/config/test_reference.py checks that the
committed files are current and that the keys are exactly those the loader accepts.

Pure but for `main`, which writes the two files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from proxy.config.fallback_options import FALLBACK_TYPES, validate_fallback_options
from proxy.config.keys import BY_ID, SECTIONS, Key, Schema, Section
from proxy.config.load import RESERVED_SERVICE_NAMES
from proxy.config.model import (
    AdminSettings, ClusterSettings, Match, Policy, ProbeSpec, RetryPolicy, ServerSettings, StorageSettings,
    TlsSettings,
)
from proxy.config.policy import ENV_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
SCHEMA = ROOT / "config" / "breakers.schema.json"
REQUIRED = "required"
EACH_KEY = "each key's default"  # a section left out: as if written empty
_MINIMAL_OPTIONS = {"static": {"file": "x"}, "cache": {}, "queue": {},
                    "table": {"rows": {"w": {"cost": 1}}, "default_row": "w"}}


# --- defaults, as the loader builds them --------------------------------------------------------

def _instance_defaults(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in fields(instance)}


def defaults() -> dict[str, dict[str, Any]]:
    """Section id → key → the built-in default (REQUIRED, or None for "not set")."""
    out: dict[str, dict[str, Any]] = {
        "": {**dict.fromkeys(("server", "storage", "admin", "cluster", "alerts", "defaults"), EACH_KEY),
             "services": REQUIRED},
        "server": _instance_defaults(ServerSettings()),
        "storage": _instance_defaults(StorageSettings()),
        "admin": _instance_defaults(AdminSettings()),
        "cluster": _instance_defaults(ClusterSettings()),
        "alerts": {"webhooks": []},
        "alerts.webhooks[]": {"url": REQUIRED, "events": sorted({"open", "close"})},
        "defaults": {**_instance_defaults(Policy()), "window": {"type": "count", "size": 20},
                     "retry": _instance_defaults(RetryPolicy()), "probe": None},
        "window": {"type": "count", "size": 20, "seconds": 30},
        "retry": _instance_defaults(RetryPolicy()),
        "probe": {**_instance_defaults(ProbeSpec(path="/")), "path": REQUIRED},
        "services.<service>": {"upstream": REQUIRED, "tls": None, "routes": {"default": {}}},
        "tls": _instance_defaults(TlsSettings()),
        "routes.<route>": {"match": None, "fallback": None},
        "match": _instance_defaults(Match()),
        "fallback": {"type": REQUIRED, "on_failure": True},
    }
    for kind in FALLBACK_TYPES:
        def refuse(key: str | None, message: str) -> None:
            raise AssertionError(f"{kind} minimal options: {key}: {message}")
        options = validate_fallback_options(kind, dict(_MINIMAL_OPTIONS[kind]), None, refuse)
        assert options is not None
        options.update({key: REQUIRED for key in _MINIMAL_OPTIONS[kind]})
        out[f"fallback: {kind}"] = options
    return out


def _yaml(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (frozenset, set)):
        value = sorted(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _shown_default(section: str, key: str, value: Any) -> str:
    if value is REQUIRED:
        return "**required**"
    if value is EACH_KEY:
        return value
    if value is None:
        return {"match": "any", "routes.<route>": "none"}.get(section, "not set")
    return f"`{_yaml(value)}`"


# --- markdown -----------------------------------------------------------------------------------

def type_name(schema: Schema) -> str:
    """A reader's name for a JSON Schema fragment: "integer ≥ 1", "list of status"."""
    if "anyOf" in schema:
        return " or ".join(type_name(s) for s in schema["anyOf"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    if "$ref" in schema:
        return "mapping"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(type_name({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"list of {type_name(schema.get('items', {}))}"
    if kind == "object":
        return "mapping"
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if kind == "integer" and (low, high) == (100, 599):
            return "HTTP status"
        parts = []
        if low is not None and high is not None:
            parts.append(f"{low:g}–{high:g}")
        elif low is not None:
            parts.append(f"≥ {low:g}")
        elif high is not None:
            parts.append(f"≤ {high:g}")
        if above is not None:
            parts.append(f"> {above:g}")
        if below is not None:
            parts.append(f"< {below:g}")
        return " ".join([kind, ", ".join(parts)]).strip()
    return {"string": "string", "boolean": "boolean", "null": "`null`"}.get(kind, "any")


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(section: Section, key: Key, default: Any) -> str:
    kind = type_name(key.schema)
    if key.ref is not None:
        kind = f"[{kind}](#{_anchor(BY_ID[key.ref].title)})"
    text = key.text
    env = [name for name, target in ENV_OVERRIDES.items() if target == key.name and section.id == "defaults"]
    if env:
        text += f" Environment: `{env[0]}`."
    example = f"`{key.name}: {key.example}`"
    return (f"| `{key.name}` | {_cell(kind)} | {_cell(_shown_default(section.id, key.name, default))} | "
            f"{_cell(example)} | {_cell(text)} |")


INTRO = """# Configuration reference

<!-- Generated by `python -m proxy.config.reference` from proxy/config/keys.py and the loader's
     own defaults; tests/config/test_reference.py fails when this file is stale. -->

`circuit-proxy run` and `demo` read `config/breakers.yaml` unless `--config PATH` says
otherwise; `circuit-proxy check [PATH]` validates a file the same way (exit 0, or exit 2 with
one line per problem, in the order of the file's lines). The file is YAML, loaded safely.
Unknown keys are an error, with the nearest known key suggested. Units are in the key names
(`timeout_ms`, `max_age_s`).

Editors that speak the yaml-language-server protocol (VS Code's YAML extension, for one)
complete keys and flag errors while typing, from
[`config/breakers.schema.json`](../config/breakers.schema.json), which the shipped file names
on its first line:

```yaml
# yaml-language-server: $schema=./breakers.schema.json
```

**Inheritance.** The [breaker and call settings](#breaker-and-call-settings) can be written
under `defaults`, on a service and on a route. A route takes each one from the first of: the
route, its service, the environment variable (for the three that have one), `defaults`, the
built-in default. So an environment variable overrides `defaults` but never what a service or
route sets itself. `retry` merges key by key across these levels; `probe` and `window` are
replaced as a whole. Every other key is written in one place only.

**Reload.** `kill -HUP <pid>` or `POST /admin/reload` re-reads the file. A route whose
breaker settings did not change keeps its state and counts, even when its fallback, match or
upstream changed (those are applied, and reported in `X-Reload-Changed`). `server.host`,
`server.port`, `server.access_log`, `server.log_format`, `storage.path` and `admin.token_env`
are read at start only.

A small file, everything else left at its default:

```yaml
defaults:
  failure_threshold: 5
  open_timeout_ms: 30000
services:
  payment:
    upstream: http://127.0.0.1:9101
    timeout_ms: 3000                 # for every payment route
    routes:
      charges:
        match: {methods: [POST], path: /charges}
        failure_rate_threshold: 30   # this route only
        fallback: {type: queue, amount_field: amount, floor_limit: 100, exposure_cap: 5000}
  inventory:
    upstream: http://127.0.0.1:9102
    routes:
      stock:
        match: {methods: [GET], path: /stock}
        fallback: {type: cache, max_age_s: 3600, scale: {available: 0.5}}
```

The shipped [`config/breakers.yaml`](../config/breakers.yaml) is a complete example. Below,
each section lists its keys with their type, built-in default, an example and what they do.
"""


def markdown() -> str:
    built = defaults()
    out = [INTRO]
    for section in SECTIONS:
        out.append(f"## {section.title}\n")
        if section.where:
            out.append(f"Written as `{section.where}`.\n")
        out.append(section.text + "\n")
        out.append("| key | type | default | example | meaning |")
        out.append("|---|---|---|---|---|")
        for key in section.keys:
            out.append(_row(section, key, built[section.id].get(key.name)))
        out.append("")
    return "\n".join(out)


# --- JSON Schema --------------------------------------------------------------------------------

def _described(section: Section, key: Key, default: Any) -> Schema:
    schema = dict(key.schema)
    if key.ref is not None and schema.get("type") != "array":  # a list of them says so itself
        # allOf: beside a bare $ref, draft-07 ignores the description.
        schema = {"allOf": [{"$ref": f"#/definitions/{_REFS[key.ref]}"}]}
    schema["description"] = key.text
    if key.ref is None and default not in (REQUIRED, EACH_KEY) and isinstance(default, (bool, int, float, str, list)):
        schema["default"] = default
    return schema


# Sections that are mappings of their own, by definition name; the others are inlined.
_REFS = {"server": "server", "storage": "storage", "admin": "admin", "cluster": "cluster", "alerts": "alerts",
         "alerts.webhooks[]": "webhook", "defaults": "policy", "window": "window", "retry": "retry",
         "probe": "probe", "tls": "tls", "match": "match", "fallback": "fallback",
         "services.<service>": "services", "routes.<route>": "routes"}
_NULLABLE_REFS = {"server", "storage", "admin", "cluster", "alerts", "defaults", "window", "retry", "probe",
                  "tls", "match"}


# What the loader checks across keys, as far as JSON Schema can say it (an editor flags it too).
_CROSS_KEY: dict[str, Schema] = {
    "storage": {"not": {"required": ["url", "url_env"]}},
    "match": {"not": {"required": ["path", "path_regex"]}},
    "window": {"if": {"properties": {"type": {"const": "time"}}, "required": ["type"]},
               "then": {"not": {"required": ["size"]}}, "else": {"not": {"required": ["seconds"]}}},
    "tls": {"dependencies": {"client_key": ["client_cert"]}},
    "fallback: queue": {"dependencies": {"floor_limit": ["amount_field"], "exposure_cap": ["amount_field"]}},
}


def _properties(section_id: str, built: dict[str, dict[str, Any]]) -> dict[str, Schema]:
    section = BY_ID[section_id]
    return {key.name: _described(section, key, built[section_id].get(key.name)) for key in section.keys}


def _object(properties: dict[str, Schema], required: list[str] | None = None, *,
            nullable: bool = False) -> Schema:
    """A mapping of exactly these keys (`null`, when allowed, reads as an empty one)."""
    schema: Schema = {"type": ["object", "null"] if nullable else "object", "properties": properties,
                      "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def json_schema() -> dict[str, Any]:
    built = defaults()

    def required(section_id: str) -> list[str]:
        return [k for k, v in built[section_id].items() if v is REQUIRED]

    policy = _properties("defaults", built)
    fallback_types = []
    for kind in FALLBACK_TYPES:
        section_id = f"fallback: {kind}"
        then = _object({**_properties("fallback", built), **_properties(section_id, built)}, required(section_id))
        then.update(_CROSS_KEY.get(section_id, {}))
        fallback_types.append({"if": {"properties": {"type": {"const": kind}}, "required": ["type"]}, "then": then})
    definitions = {
        name: _object(_properties(section_id, built), required(section_id), nullable=section_id in _NULLABLE_REFS)
        for section_id, name in _REFS.items()
        if section_id not in ("defaults", "fallback", "services.<service>", "routes.<route>")
    }
    for section_id, name in _REFS.items():
        definitions.get(name, {}).update(_CROSS_KEY.get(section_id, {}))
    definitions["policy"] = _object(policy, nullable=True)
    definitions["fallback"] = {"type": "object", "required": ["type"],
                               "properties": _properties("fallback", built), "allOf": fallback_types}
    definitions["service"] = _object({**policy, **_properties("services.<service>", built)}, ["upstream"])
    definitions["route"] = _object({**policy, **_properties("routes.<route>", built)}, nullable=True)
    definitions["services"] = {
        "type": "object", "minProperties": 1,
        "propertyNames": {"pattern": "^[a-z0-9][a-z0-9_-]*$", "not": {"enum": sorted(RESERVED_SERVICE_NAMES)}},
        "additionalProperties": {"$ref": "#/definitions/service"}}
    definitions["routes"] = {
        "type": ["object", "null"], "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*$"},
        "additionalProperties": {"$ref": "#/definitions/route"}}
    definitions["table_row"] = _object({
        "cost": {"type": "number", "description": "The price before weight."},
        "per_kg": {"type": "number", "description": "Added per unit of weight_field."},
        "currency": {"description": "Passed through to the answer."},
        "eta_days": {"description": "Passed through to the answer."},
        "carrier": {"description": "Passed through to the answer."},
    }, ["cost"])
    top = _object(_properties("", built), ["services"])
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "circuit-proxy configuration (config/breakers.yaml)",
        "description": "Generated by `python -m proxy.config.reference`; see docs/configuration.md.",
        **top,
        "definitions": dict(sorted(definitions.items())),
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def generated() -> dict[Path, str]:
    return {DOC: markdown(), SCHEMA: schema_text()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.config.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale, write nothing")
    args = parser.parse_args(argv)
    stale = [path for path, text in generated().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: stale; run python -m proxy.config.reference", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
