"""Validation of each fallback type's options (contract §5), for the config loader.

Pure: it checks values and paths, builds nothing that serves requests. `report(key, message)`
lets the loader attach file, line and key path to each problem.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.config.values import unknown_key
from proxy.core.template import TemplateError, load_response_file

FALLBACK_TYPES = ("static", "cache", "queue", "table")
# Keys of every fallback mapping, beside its type's options (the loader reads these two).
COMMON_KEYS = ("type", "on_failure")
# Each type's options, as the checks below read them (docs/configuration.md lists them all).
OPTIONS: dict[str, tuple[str, ...]] = {
    "static": ("file", "status"),
    "cache": ("max_age_s", "max_entries", "scale", "default_file", "max_body_bytes", "max_bytes"),
    "queue": ("max_depth", "max_attempts", "max_body_bytes", "amount_field", "floor_limit",
              "exposure_cap", "retry_base_ms", "retry_max_ms", "replay_timeout_ms"),
    "table": ("key", "zones", "rows", "default_row", "weight_field", "status"),
}
ROW_KEYS = ("cost", "per_kg", "currency", "eta_days", "carrier")  # a table row's fields

Report = Callable[[str | None, str], None]


def resolve_fallback_file(fallback_dir: Path, name: str) -> Path | None:
    """`fallback_responses/NAME`, or None when NAME would leave that folder."""
    if not name or Path(name).is_absolute() or "\x00" in name:
        return None
    root = fallback_dir.resolve()
    target = (root / name).resolve()
    return target if target.is_relative_to(root) and target != root else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    def __init__(self, kind: str, raw: dict[str, Any], report: Report, fallback_dir: Path | None) -> None:
        self.kind = kind
        self.raw = raw
        self.report = report
        self.fallback_dir = fallback_dir
        self.ok = True

    def fail(self, key: str | None, message: str) -> None:
        self.ok = False
        self.report(key, message)

    def known(self) -> None:
        keys = OPTIONS[self.kind]
        for key in self.raw:
            if key not in keys:
                self.fail(key, unknown_key(key, (*COMMON_KEYS, *keys), f"option for a {self.kind} fallback"))

    def integer(self, key: str, default: int | None, minimum: int) -> int | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if not _is_int(value) or value < minimum:
            self.fail(key, f"must be an integer ≥ {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: float | None, minimum: float) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if not _is_number(value) or value < minimum:
            self.fail(key, f"must be a number ≥ {minimum:g}, got {value!r}")
        return value

    def text(self, key: str, default: str | None) -> str | None:
        value = self.raw.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def file(self, key: str, *, required: bool) -> str | None:
        name = self.raw.get(key)
        if name is None:
            if required:
                self.fail(None if key not in self.raw else key, f"{key}: required")
            return None
        if not isinstance(name, str) or not name:
            self.fail(key, f"must be a file name in fallback_responses/, got {name!r}")
            return None
        if self.fallback_dir is None:
            return name
        target = resolve_fallback_file(self.fallback_dir, name)
        if target is None:
            self.fail(key, f"{name!r} resolves outside {self.fallback_dir}")
        elif not target.is_file():
            self.fail(key, f"no such file in {self.fallback_dir}: {name!r}")
        else:
            try:
                load_response_file(target)
            except TemplateError as exc:
                self.fail(key, f"{name}: {exc}")
        return name


def _static(c: _Checker) -> dict[str, Any]:
    c.known()
    status = c.raw.get("status")
    if status is not None and (not _is_int(status) or not 100 <= status <= 599):
        c.fail("status", f"must be an HTTP status 100..599, got {status!r}")
    return {"file": c.file("file", required=True), "status": status}


def _cache(c: _Checker) -> dict[str, Any]:
    c.known()
    scale = c.raw.get("scale", {})
    if not isinstance(scale, dict) or not all(
            isinstance(k, str) and _is_number(v) and v >= 0 for k, v in scale.items()):
        c.fail("scale", f"must map JSON field names to factors ≥ 0, got {scale!r}")
        scale = {}
    return {
        "max_age_s": c.number("max_age_s", 3600, 0.001),
        "max_entries": c.integer("max_entries", 10_000, 1),
        "max_body_bytes": c.integer("max_body_bytes", 1_048_576, 1),
        "max_bytes": c.integer("max_bytes", 64 << 20, 1),  # all entries together
        "scale": dict(scale),
        "default_file": c.file("default_file", required=False),
    }


def _queue(c: _Checker) -> dict[str, Any]:
    c.known()
    options = {
        "max_depth": c.integer("max_depth", 10_000, 1),
        "max_attempts": c.integer("max_attempts", 8, 1),
        "max_body_bytes": c.integer("max_body_bytes", 1_048_576, 1),
        "amount_field": c.text("amount_field", None),
        "floor_limit": c.number("floor_limit", None, 0),
        "exposure_cap": c.number("exposure_cap", None, 0),
        "retry_base_ms": c.integer("retry_base_ms", 500, 1),
        "retry_max_ms": c.integer("retry_max_ms", 60_000, 1),
        "replay_timeout_ms": c.integer("replay_timeout_ms", None, 1),
    }
    base, most = options["retry_base_ms"], options["retry_max_ms"]
    if _is_int(base) and _is_int(most) and most < base:
        c.fail("retry_max_ms", f"must be ≥ retry_base_ms ({base}), got {most}")
    limits = [k for k in ("floor_limit", "exposure_cap") if options[k] is not None]
    if limits and options["amount_field"] is None:
        c.fail(limits[0], "needs amount_field (the JSON field holding the amount)")
    return options


def _table(c: _Checker) -> dict[str, Any]:
    c.known()
    key = c.text("key", "destination.country")
    weight_field = c.text("weight_field", "weight_kg")
    zones = c.raw.get("zones", {})
    rows = c.raw.get("rows")
    if not isinstance(zones, dict) or not all(isinstance(v, str) for v in zones.values()):
        c.fail("zones", f"must map request values to row names, got {zones!r}")
        zones = {}
    zones = dict(zones)
    for value in [k for k in zones if isinstance(k, bool)]:
        # YAML 1.1 reads NO, no, off, yes, on as booleans: Norway would silently vanish.
        c.fail("zones", f"key {value!r} is how YAML reads an unquoted NO/OFF/YES/ON; quote country "
                        'codes ("NO": europe)')
        del zones[value]
    if not isinstance(rows, dict) or not rows:
        c.fail("rows" if "rows" in c.raw else None, "rows: required, a mapping of row name → row")
        rows = {}
    for name, row in rows.items():
        if not isinstance(row, dict) or not _is_number(row.get("cost")):
            c.fail("rows", f"row {name!r} needs a numeric cost")
            continue
        unknown = [k for k in row if k not in ROW_KEYS]
        if unknown:
            c.fail("rows", f"row {name!r}: {unknown[0]}: {unknown_key(str(unknown[0]), ROW_KEYS, 'field')}")
        if "per_kg" in row and not _is_number(row["per_kg"]):
            c.fail("rows", f"row {name!r}: per_kg must be a number")
    for value, zone in zones.items():
        if zone not in rows:
            c.fail("zones", f"{value!r} names row {zone!r}, which is not in rows")
    default_row = c.text("default_row", None)
    if default_row is None:
        c.fail(None, "default_row: required (the row used when nothing matches)")
    elif default_row not in rows:
        c.fail("default_row", f"{default_row!r} is not in rows")
    status = c.raw.get("status", 200)
    if not _is_int(status) or not 200 <= status <= 299:
        c.fail("status", f"must be a 2xx status, got {status!r}")
    return {"key": key, "weight_field": weight_field, "status": status,
            "zones": {str(k).upper(): v for k, v in zones.items()}, "rows": rows,
            "default_row": default_row}


_CHECKS: dict[str, Callable[[_Checker], dict[str, Any]]] = {
    "static": _static, "cache": _cache, "queue": _queue, "table": _table,
}


def validate_fallback_options(kind: str, raw: dict[str, Any], fallback_dir: Path | None,
                              report: Report) -> dict[str, Any] | None:
    """The options with defaults filled in, or None after reporting every problem."""
    checker = _Checker(kind, raw, report, fallback_dir)
    options = _CHECKS[kind](checker)
    return options if checker.ok else None
