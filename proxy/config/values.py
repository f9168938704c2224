"""Checks of single config values: (raw YAML value) → converted value, or raise Invalid.

Pure: no file, environment or YAML node access; `config_load` attaches file, line and key path.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import SplitResult, urlsplit

ALERT_EVENTS = frozenset({"open", "close", "half_open", "forced_open", "forced_closed", "disabled"})
_METHOD = re.compile(r"[A-Z]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: what a method may be
_REQUEST_TARGET = re.compile(r"/[\x21-\x7e]*")  # printable ASCII, no space: one request line
AUTO = "auto"  # slow_call_duration_ms: learned from the route's own latency (§3a)


class Invalid(Exception):
    """One value is wrong; the walker adds file, line and key path."""


def unknown_key(key: str, known: Iterable[str], what: str = "key") -> str:
    """"unknown key (did you mean timeout_ms?)": the nearest known key, not all of them; the
    whole list only when none is near (a short list, or the reader would have no clue)."""
    known = list(known)
    nearest = difflib.get_close_matches(key, known, n=1)
    if nearest:
        return f"unknown {what} (did you mean {nearest[0]}?)"
    return f"unknown {what} (known: {', '.join(known)})" if what != "key" else "unknown key"


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"not an integer: {value!r}")
        if minimum is not None and value < minimum:
            raise Invalid(f"must be ≥ {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be ≤ {maximum}, got {value}")
        return value
    return check


def number(minimum: float | None = None, maximum: float | None = None, *,
            below: float | None = None, above: float | None = None) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        # NaN (YAML .nan) passes every comparison below, so it is refused by name.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise Invalid(f"not a number: {value!r}")
        if above is not None and value <= above:
            raise Invalid(f"must be > {above:g}, got {value:g}")
        if minimum is not None and value < minimum:
            raise Invalid(f"must be ≥ {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be ≤ {maximum:g}, got {value:g}")
        if below is not None and value >= below:
            raise Invalid(f"must be < {below:g}, got {value:g}")
        return float(value)
    return check


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"not a non-empty string: {value!r}")
    return value


def file_name(value: Any) -> str | None:
    """A file's name as written, or None (YAML `null`: the key's default)."""
    return None if value is None else text(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"not a boolean: {value!r}")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}, got {value!r}")
        return value
    return check


def statuses(value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"not a non-empty list of status codes: {value!r}")
    for status in value:
        integer(100, 599)(status)
    return frozenset(value)


def status_or_statuses(value: Any) -> frozenset[int]:
    """One status code or a non-empty list of them (`probe.expect_status`)."""
    return frozenset({integer(100, 599)(value)}) if not isinstance(value, list) else statuses(value)


def slow_duration(value: Any) -> int | str:
    """`slow_call_duration_ms`: milliseconds ≥ 1, or `auto` (§3a)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"not an integer or '{AUTO}': {value!r}")
    return integer(1)(value)


def token(value: Any) -> str:
    """An HTTP method as sent: a token (RFC 9110), case kept since methods are case-sensitive."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise Invalid(f"not an HTTP method (a token): {value!r}")
    return value


def request_path(value: Any) -> str:
    """A path (and optional query) to send as is: starts with '/', no space, control or '#'."""
    string = text(value)
    if not string.startswith("/"):
        raise Invalid(f"must start with '/': {string!r}")
    if not _REQUEST_TARGET.fullmatch(string) or "#" in string:
        raise Invalid(f"must be printable ASCII without spaces or '#': {string!r}")
    if any(segment in (".", "..") for segment in string.split("?", 1)[0].split("/")):
        raise Invalid(f"must not contain dot-segments: {string!r}")
    return string


def _split_url(string: str, *, echo: bool) -> tuple[SplitResult, int | None]:
    """The URL's parts and port; a malformed one is Invalid (quoted only with `echo`)."""
    try:
        parts = urlsplit(string)
        return parts, parts.port
    except ValueError as exc:
        raise Invalid(f"malformed URL {string!r}: {exc}" if echo else f"malformed URL: {exc}") from None


def http_url(value: Any) -> str:
    """An http(s) URL with a host; an optional base path; no query or fragment."""
    string = text(value)
    parts, port = _split_url(string, echo=True)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"not an http(s) URL with a host: {string!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise Invalid(f"must not carry a query, fragment or credentials: {string!r}")
    if port == 0:
        raise Invalid(f"port must be 1..65535: {string!r}")
    return string.rstrip("/")


def postgres_url(value: Any) -> str:
    """A PostgreSQL connection URL (libpq style, as asyncpg takes it) with a host or a socket."""
    string = text(value)
    parts, port = _split_url(string, echo=False)  # the URL may hold a password: not echoed
    if parts.scheme not in ("postgresql", "postgres"):
        raise Invalid("not a postgresql:// URL")
    if port == 0:
        raise Invalid("port must be 1..65535")
    return string


def events(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"not a non-empty list of events: {value!r}")
    unknown = [v for v in value if v not in ALERT_EVENTS]
    if unknown:
        raise Invalid(f"unknown event {unknown[0]!r} (known: {', '.join(sorted(ALERT_EVENTS))})")
    return frozenset(value)


def methods(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"not a non-empty list of methods: {value!r}")
    methods = set()
    for method in value:
        if not isinstance(method, str) or not _METHOD.fullmatch(method.upper()):
            raise Invalid(f"not an HTTP method: {method!r}")
        methods.add(method.upper())
    return frozenset(methods)


def path_prefix(value: Any) -> str:
    string = text(value)
    if not string.startswith("/"):
        raise Invalid(f"must start with '/': {string!r}")
    if any(segment in (".", "..") for segment in string.split("/")):
        raise Invalid(f"must not contain dot-segments: {string!r}")
    return string.rstrip("/") or "/"


def regex(value: Any) -> str:
    string = text(value)
    try:
        re.compile(string)
    except re.error as exc:
        raise Invalid(f"not a valid regular expression: {exc}") from None
    return string


POLICY_VALUES: dict[str, Callable[[Any], Any]] = {
    "failure_threshold": integer(0),
    "success_threshold": integer(1),
    "open_timeout_ms": integer(1),
    "max_open_timeout_ms": integer(1),
    "backoff_multiplier": number(1.0),
    "jitter": number(0.0, below=1.0),
    "half_open_max_calls": integer(1),
    "minimum_calls": integer(1),
    "failure_rate_threshold": number(0.0, 100.0),
    "slow_call_duration_ms": slow_duration,
    "auto_slow_factor": number(above=1.0),
    "auto_slow_floor_ms": integer(1),
    "max_slow_in_flight": integer(0),
    "slow_call_rate_threshold": number(0.0, 100.0),
    "failure_statuses": statuses,
    "timeout_ms": integer(1),
    "connect_timeout_ms": integer(1),
    "max_concurrent": integer(0),
}

# The keys of the `retry` and `probe` mappings (§3b); policy.py walks the mappings.
RETRY_VALUES: dict[str, Callable[[Any], Any]] = {
    "attempts": integer(0, 10),
    "backoff_ms": integer(0),
    "budget_percent": number(0.0, 100.0),
    "max_body_bytes": integer(0),
}
PROBE_VALUES: dict[str, Callable[[Any], Any]] = {
    "path": request_path,
    "method": token,
    "interval_ms": integer(10),
    "expect_status": status_or_statuses,
}
