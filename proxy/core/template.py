"""Canned responses from `fallback_responses/`: the file format and its placeholders.

Format (decided here, documented in docs/fallbacks.md):
- `NAME.json` is a response spec: a JSON object with only the keys `status` (100..599,
  default 200), `headers` (object of strings) and `body`. A `body` that is a string is sent as
  it is (text/plain unless `headers` say otherwise); any other JSON value is sent as JSON.
- Any other file is a body sent as it is, status 200, Content-Type from its extension.

Placeholders `{{name}}` may appear in bodies and header values: `breaker`, `service`, `route`,
`state`, `reason`, `retry_after` (whole seconds until half-open, rounded up; null when not
open), `retry_at` (ISO 8601 or null), `method`, `path`, `now`, `query.NAME`, `header.NAME`,
`segment.N` (the N-th path segment after the service, negative from the end) and
`body.a.b` (a field of the request's JSON body). Inside a JSON body, a string that is exactly
one placeholder becomes the value itself with its JSON type (`"{{retry_after}}"` → `12`);
anywhere else the value is inserted as text, JSON-escaped in JSON, HTML-escaped in HTML,
stripped of control characters in headers.

Files are parsed and placeholders compiled once, at load, into lists of parts: rendering is a
join. Pure: no asyncio, aiohttp or SQLite; `load_response_file` reads one file (at load only).
"""

from __future__ import annotations

import html
import json
import math
import mimetypes
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
_NAMES = frozenset({"breaker", "service", "route", "state", "reason", "retry_after", "retry_at",
                    "method", "path", "now"})
_PREFIXES = ("query.", "header.", "body.", "segment.")
# Never echoed into a response: they carry credentials.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_FORBIDDEN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                                "upgrade", "trailer", "te"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPEC_KEYS = ("status", "headers", "body")


class TemplateError(ValueError):
    """A response file that cannot be served; the message says exactly why."""


@dataclass(frozen=True, slots=True)
class RenderContext:
    """What placeholders may show; built per served request (cheap: no parsing here)."""

    breaker: str
    state: str
    reason: str
    retry_after: float | None  # seconds until half-open, only while open
    retry_at_wall: float | None
    method: str
    path: str  # the raw request path, query excluded
    query: Mapping[str, str]
    headers: Mapping[str, str]
    segments: Sequence[str]  # decoded path segments after /<service>
    body: Any  # the request's parsed JSON body, or None
    now_wall: float


Getter = Callable[[RenderContext], Any]
Part = bytes | tuple[Getter, Callable[[Any], str]]


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _dig(value: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


class _BodyField:
    """`{{body.a.b}}`: the only placeholders that need the request body read."""

    __slots__ = ("keys",)

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys

    def __call__(self, c: RenderContext) -> Any:
        return _dig(c.body, self.keys)


def _segment(index: int) -> Getter:
    def get(c: RenderContext) -> Any:
        return c.segments[index] if -len(c.segments) <= index < len(c.segments) else None
    return get


_SIMPLE: dict[str, Getter] = {
    "breaker": lambda c: c.breaker,
    "service": lambda c: c.breaker.partition(".")[0],
    "route": lambda c: c.breaker.partition(".")[2],
    "state": lambda c: c.state,
    "reason": lambda c: c.reason,
    "retry_after": lambda c: None if c.retry_after is None else max(1, math.ceil(c.retry_after)),
    "retry_at": lambda c: _iso(c.retry_at_wall),
    "method": lambda c: c.method,
    "path": lambda c: c.path,
    "now": lambda c: _iso(c.now_wall),
}


def compile_placeholder(name: str) -> Getter:
    """The getter for one placeholder name, or TemplateError naming what is wrong."""
    if name in _SIMPLE:
        return _SIMPLE[name]
    prefix, _, rest = name.partition(".")
    if not rest or f"{prefix}." not in _PREFIXES:
        raise TemplateError(f"unknown placeholder {{{{{name}}}}} (known: {', '.join(sorted(_NAMES))}, "
                            "query.NAME, header.NAME, segment.N, body.FIELD)")
    if prefix == "query":
        return lambda c: c.query.get(rest)
    if prefix == "header":
        if rest.lower() in _SECRET_HEADERS:
            raise TemplateError(f"placeholder {{{{{name}}}}} would echo a credential")
        return lambda c: c.headers.get(rest)
    if prefix == "segment":
        try:
            return _segment(int(rest))
        except ValueError:
            raise TemplateError(f"placeholder {{{{{name}}}}}: segment needs an integer index") from None
    return _BodyField(tuple(rest.split(".")))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _json_value(value: Any) -> str:
    return json.dumps(value)


def _json_string(value: Any) -> str:
    return json.dumps(_text(value))[1:-1]


def _html(value: Any) -> str:
    return html.escape(_text(value))


def _header(value: Any) -> str:
    return _CONTROL.sub("", _text(value))


def _split(text: str, encode_literal: Callable[[str], str], escape: Callable[[Any], str]) -> list[Part]:
    parts: list[Part] = []
    at = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > at:
            parts.append(encode_literal(text[at:match.start()]).encode())
        parts.append((compile_placeholder(match.group(1)), escape))
        at = match.end()
    if at < len(text):
        parts.append(encode_literal(text[at:]).encode())
    return parts


def _json_parts(value: Any) -> list[Part]:
    """JSON text of `value` with its placeholders as parts (see the module docstring)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole is not None:
            return [(compile_placeholder(whole.group(1)), _json_value)]
        return [b'"', *_split(value, lambda s: json.dumps(s)[1:-1], _json_string), b'"']
    if isinstance(value, dict):
        parts: list[Part] = [b"{"]
        for index, (key, item) in enumerate(value.items()):
            if index:
                parts.append(b", ")
            parts += [b'"', *_split(key, lambda s: json.dumps(s)[1:-1], _json_string), b'": ']
            parts += _json_parts(item)
        return [*parts, b"}"]
    if isinstance(value, list):
        parts = [b"["]
        for index, item in enumerate(value):
            if index:
                parts.append(b", ")
            parts += _json_parts(item)
        return [*parts, b"]"]
    return [json.dumps(value).encode()]


def _merge(parts: list[Part]) -> tuple[Part, ...]:
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += part
        else:
            merged.append(part)
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[Part, ...]

    @property
    def is_constant(self) -> bool:
        return all(isinstance(p, bytes) for p in self.parts)

    def render(self, context: RenderContext | None) -> bytes:
        parts = self.parts
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(p if isinstance(p, bytes) else p[1](p[0](context)).encode() for p in parts)

    def render_text(self, context: RenderContext | None) -> str:
        return self.render(context).decode()


@dataclass(frozen=True, slots=True)
class ResponseSpec:
    status: int
    headers: tuple[tuple[str, Template], ...]  # Content-Type included
    body: Template
    needs_body: bool  # a placeholder reads the request body

    def has_header(self, name: str) -> bool:
        return any(n.lower() == name.lower() for n, _ in self.headers)


def _uses_body(templates: Sequence[Template]) -> bool:
    return any(isinstance(p, tuple) and isinstance(p[0], _BodyField) for t in templates for p in t.parts)


def _spec_from_json(document: Any) -> ResponseSpec:
    if not isinstance(document, dict):
        raise TemplateError("a .json response file must be an object with status, headers and body")
    unknown = [k for k in document if k not in _SPEC_KEYS]
    if unknown:
        raise TemplateError(f"unknown key {unknown[0]!r} (a .json response file holds "
                            "status, headers and body)")
    status = document.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise TemplateError(f"status must be an HTTP status 100..599, got {status!r}")
    raw_headers = document.get("headers", {})
    if not isinstance(raw_headers, dict):
        raise TemplateError(f"headers must be an object of strings, got {raw_headers!r}")
    headers: list[tuple[str, Template]] = []
    for name, value in raw_headers.items():
        if not _TOKEN.fullmatch(name):
            raise TemplateError(f"headers: {name!r} is not a valid header name")
        if name.lower() in _FORBIDDEN_HEADERS:
            raise TemplateError(f"headers: {name} is set by the proxy, not by a response file")
        if not isinstance(value, str) or _CONTROL.search(value):
            raise TemplateError(f"headers: {name} must be a string without control characters")
        headers.append((name, Template(_merge(_split(value, str, _header)))))
    body = document.get("body", "")
    if isinstance(body, str):
        content_type = "text/plain; charset=utf-8"
        template = Template(_merge(_split(body, str, _text)))
    else:
        content_type = "application/json"
        template = Template(_merge(_json_parts(body)))
    if not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", Template((content_type.encode(),))))
    templates = [template, *(t for _, t in headers)]
    return ResponseSpec(status, tuple(headers), template, _uses_body(templates))


def _spec_from_bytes(name: str, data: bytes) -> ResponseSpec:
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return ResponseSpec(200, (("Content-Type", Template((content_type.encode(),))),),
                            Template((data,)), False)
    if content_type.startswith("text/") or content_type in ("application/json", "application/xml"):
        content_type += "; charset=utf-8"
    escape = _html if "html" in content_type or "xml" in content_type else _text
    template = Template(_merge(_split(text, str, escape))) if text else Template((b"",))
    return ResponseSpec(200, (("Content-Type", Template((content_type.encode(),))),), template,
                        _uses_body([template]))


def parse_response(name: str, data: bytes) -> ResponseSpec:
    """The spec of a file named `name` with contents `data` (TemplateError if unusable)."""
    if name.lower().endswith(".json"):
        try:
            document = json.loads(data)
        except UnicodeDecodeError as exc:
            raise TemplateError(f"not UTF-8: {exc}") from None
        except json.JSONDecodeError as exc:
            raise TemplateError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        return _spec_from_json(document)
    return _spec_from_bytes(name, data)


def load_response_file(path: Path) -> ResponseSpec:
    """Read and compile one response file (at load time only)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TemplateError(f"cannot read: {exc.strerror or exc}") from None
    return parse_response(path.name, data)
