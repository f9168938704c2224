"""What the fast server writes that is not a forwarded response: the contract's own answers
(§4, the same JSON bodies as `responses`), fallback and other aiohttp `web.Response`s turned
into bytes, and the aiohttp `web.Request` a fallback is handed (built only when one is called).
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.fastserver_parse import RequestHead
from proxy.responses import retry_after_header

_date_second = 0
_date_line = b""


def date_line() -> bytes:
    """`Date: …\\r\\n`, formatted once per second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


def reason_of(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
                 for status in HTTPStatus}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = reason_of(status)
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def json_answer(status: int, document: Any, *, keep_alive: bool, head_only: bool = False,
                extra: bytes = b"") -> bytes:
    """A whole JSON response as `responses.json_response` would send it."""
    body = json.dumps(document).encode()
    head = (status_line(status) + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + extra + date_line() + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n")
    return head if head_only else head + body


_OPEN_PREFIX: dict[str, bytes] = {}
_OPEN_LAST: dict[str, tuple[tuple, bytes]] = {}
_OPEN_HEAD = _STATUS_LINES[503] + b"Content-Type: application/json\r\nContent-Length: "


def circuit_open(breaker: str, retry_after: float | None, *, keep_alive: bool, head_only: bool) -> bytes:
    """§4: 503 circuit_open, Retry-After rounded up (absent while forced open).

    The open path's answer, so it is assembled from parts made once per breaker; the body is
    byte for byte what `json.dumps` gives for `responses.circuit_open`'s document."""
    # An open breaker's answer changes once a millisecond (and with the Date second): under
    # load most rejections reuse the last one built.
    rounded = None if retry_after is None else round(max(0.0, retry_after), 3)
    key = (rounded, keep_alive, head_only, _date_second if _date_second == int(time.time()) else -1)
    last = _OPEN_LAST.get(breaker)
    if last is not None and last[0] == key:
        return last[1]
    answer = _circuit_open(breaker, retry_after, rounded, keep_alive, head_only)
    _OPEN_LAST[breaker] = (key, answer)
    return answer


def _circuit_open(breaker: str, retry_after: float | None, rounded: float | None, keep_alive: bool,
                  head_only: bool) -> bytes:
    prefix = _OPEN_PREFIX.get(breaker)
    if prefix is None:
        prefix = _OPEN_PREFIX[breaker] = ('{"error": "circuit_open", "breaker": %s, "retry_after": '
                                          % json.dumps(breaker)).encode()
    if retry_after is None:
        body = prefix + b"null}"
        extra = b""
    else:
        body = prefix + repr(rounded).encode() + b"}"
        extra = b"Retry-After: " + retry_after_header(retry_after).encode() + b"\r\n"
    head = (_OPEN_HEAD + str(len(body)).encode() + b"\r\n" + extra + date_line()
            + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"))
    return head if head_only else head + body


def bulkhead_full(breaker: str, *, keep_alive: bool, head_only: bool) -> bytes:
    return json_answer(503, {"error": "bulkhead_full", "breaker": breaker}, keep_alive=keep_alive,
                       head_only=head_only, extra=b"Retry-After: 1\r\n")


def upstream_unreachable(breaker: str, detail: str, *, keep_alive: bool, head_only: bool) -> bytes:
    return json_answer(502, {"error": "upstream_unreachable", "breaker": breaker, "detail": detail},
                       keep_alive=keep_alive, head_only=head_only)


def upstream_timeout(breaker: str, timeout_s: float, *, keep_alive: bool, head_only: bool) -> bytes:
    return json_answer(504, {"error": "upstream_timeout", "breaker": breaker, "timeout_s": timeout_s},
                       keep_alive=keep_alive, head_only=head_only)


def error_answer(status: int, detail: str, limits: dict[str, int]) -> bytes:
    """Refusals before routing (always followed by closing the connection)."""
    if status == 413:
        document: dict[str, Any] = {"error": "payload_too_large", "max_body_bytes": limits["body"]}
    elif status == 431:
        document = {"error": "request_header_fields_too_large", "max_header_bytes": limits["header"]}
    else:
        document = {"error": "bad_request" if status == 400 else HTTPStatus(status).phrase.lower().replace(" ", "_"),
                    "detail": detail}
    return json_answer(status, document, keep_alive=False)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_OWN_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class _Collector:
    """Stands in for aiohttp's payload writer to turn a Payload body into bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.parts.append(bytes(data))

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            self.parts.append(bytes(data))

    async def drain(self) -> None:
        return None


async def web_response_bytes(response: web.StreamResponse, *, keep_alive: bool, head_only: bool) -> bytes:
    """An unprepared aiohttp response (a fallback's, or one of `responses`) as bytes."""
    headers = CIMultiDict(response.headers)
    body: Any = getattr(response, "body", None)
    if body is None:
        data = b""
    elif isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
    else:  # a Payload
        for key, value in body.headers.items():
            headers.setdefault(key, value)
        collector = _Collector()
        await body.write(collector)
        data = b"".join(collector.parts)
    status = response.status
    lines = [status_line(status, response.reason.encode("latin-1") if response.reason else None)]
    for key, value in headers.items():
        if key.lower() in _OWN_FRAMING or "\r" in value or "\n" in value or "\r" in key or "\n" in key:
            continue  # framing is ours; a value that could split the head is never written
        lines.append(f"{key}: {value}\r\n".encode("latin-1", "replace"))
    for morsel in response.cookies.values():
        lines.append(("Set-Cookie: " + morsel.OutputString() + "\r\n").encode("latin-1", "replace"))
    if "Date" not in headers:
        lines.append(date_line())
    bodiless = status in (204, 304) or 100 <= status < 200
    if not bodiless:
        if data and "Content-Type" not in headers:
            lines.append(b"Content-Type: application/octet-stream\r\n")
        lines.append(b"Content-Length: %d\r\n" % len(data))
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if data and not head_only and not bodiless:
        lines.append(data)
    return b"".join(lines)


class ProtocolView:
    """What an aiohttp request and its body stream ask of their protocol, answered by a fast
    server connection (for fallbacks, which are written against `web.Request`)."""

    ssl_context = None
    max_field_size = 65536
    max_headers = 128

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.transport = connection.transport
        self.peername = connection.peername
        self.sockname = connection.sockname
        self._reading_paused = False

    @property
    def connected(self) -> bool:
        return not self._connection.lost

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._connection.pause_reading("body")

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._connection.resume_reading("body")


def body_stream(view: ProtocolView, body: bytes | None, loop: Any) -> StreamReader:
    """A finished body stream holding `body`."""
    if not body:
        return EMPTY_PAYLOAD
    stream = StreamReader(view, 2**16, loop=loop)  # type: ignore[arg-type]
    stream.feed_data(body)
    stream.feed_eof()
    return stream


def web_request(head: RequestHead, view: ProtocolView, payload: StreamReader, loop: Any, *,
                app: web.Application, route: Any, max_body_bytes: int) -> web.Request:
    """A real aiohttp request for the request `head`, so a fallback sees what it would see
    behind aiohttp's own server: headers, query, remote, body (`payload`), app."""
    headers = CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, _, value in head.fields)
    target = head.target.decode("ascii")
    message = RawRequestMessage(
        head.method.decode("ascii"), target, HttpVersion11 if head.http11 else HttpVersion10,
        CIMultiDictProxy(headers), tuple((name, value) for name, _, value in head.fields),
        not head.keep_alive, None, False, head.chunked, URL(target, encoded=True))
    request = web.Request(message, payload, view, None, None, loop,  # type: ignore[arg-type]
                          client_max_size=max_body_bytes)
    if route is not None:
        match_info = UrlMappingMatchInfo({"tail": target.partition("?")[0][1:]}, route)
        match_info.add_app(app)
        match_info.freeze()
        request._match_info = match_info  # noqa: SLF001  (as aiohttp's router would set it)
    return request
