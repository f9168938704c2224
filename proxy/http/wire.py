"""Bytes on the wire that are the proxy's own: status lines, Date, chunk framing, and every
`Answer` (a fallback's, a control-plane handler's, a contract error from `core.outcome`)
turned into a response head and body.

The open path's 503 is assembled from parts made once per breaker and reused within its
millisecond: under load most rejections cost a dictionary lookup. Nothing here does I/O.
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from http import HTTPStatus

from proxy.core import outcome
from proxy.core.messages import Answer

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_OWN_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})

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
# Status lines with the upstream's own reason phrase, made once each: an upstream says the
# same few every time. Bounded, since the phrase is the upstream's to choose.
_RELAYED_LINES: dict[tuple[int, bytes], bytes] = {}
_RELAYED_MAX = 256


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = reason_of(status)
    else:
        line = _RELAYED_LINES.get((status, reason))
        if line is not None:
            return line
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_RELAYED_LINES) < _RELAYED_MAX:
            _RELAYED_LINES[(status, reason)] = line
        return line
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def answer_head(answer: Answer, *, keep_alive: bool, length: int | None) -> bytes:
    """The head of `answer`; `length` None means a chunked body follows."""
    status = answer.status
    lines = [status_line(status)]
    headers = answer.headers
    for key, value in headers.items():
        if key.lower() in _OWN_FRAMING or "\r" in value or "\n" in value or "\r" in key or "\n" in key:
            continue  # framing is ours; a value that could split the head is never written
        lines.append(f"{key}: {value}\r\n".encode("latin-1", "replace"))
    if "Date" not in headers:
        lines.append(date_line())
    if not (status in (204, 304) or 100 <= status < 200):
        if length is None:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            if length and "Content-Type" not in headers:
                lines.append(b"Content-Type: application/octet-stream\r\n")
            lines.append(b"Content-Length: %d\r\n" % length)
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def answer_bytes(answer: Answer, *, keep_alive: bool, head_only: bool = False) -> bytes:
    """A whole answer with its body (not a stream)."""
    body = answer.body
    head = answer_head(answer, keep_alive=keep_alive, length=len(body))
    if head_only or not body or answer.status in (204, 304):
        return head
    return head + body


def refusal(status: int, detail: str, *, max_body_bytes: int, max_header_bytes: int) -> bytes:
    """A request refused before routing (its connection is closed after it)."""
    if status == 413:
        answer = outcome.payload_too_large(max_body_bytes)
    elif status == 431:
        answer = outcome.headers_too_large(max_header_bytes)
    elif status == 400:
        answer = outcome.bad_request(detail)
    else:
        answer = Answer.json(status, {"error": HTTPStatus(status).phrase.lower().replace(" ", "_"),
                                      "detail": detail})
    return answer_bytes(answer, keep_alive=False)


# -- the open path ------------------------------------------------------------------------------

_OPEN_PREFIX: dict[str, bytes] = {}
_OPEN_LAST: dict[str, tuple[tuple, bytes]] = {}
_OPEN_HEAD = _STATUS_LINES[503] + b"Content-Type: application/json\r\nContent-Length: "


def circuit_open(breaker: str, retry_after: float | None, *, keep_alive: bool, head_only: bool) -> bytes:
    """§4: 503 circuit_open, byte for byte `outcome.circuit_open` on the wire.

    An open breaker's answer changes once a millisecond (and with the Date second): under
    load most rejections reuse the last one built."""
    rounded = None if retry_after is None else outcome.retry_after_value(retry_after)
    key = (rounded, keep_alive, head_only, _date_second if _date_second == int(time.time()) else -1)
    last = _OPEN_LAST.get(breaker)
    if last is not None and last[0] == key:
        return last[1]
    prefix = _OPEN_PREFIX.get(breaker)
    if prefix is None:
        prefix = _OPEN_PREFIX[breaker] = ('{"error": "circuit_open", "breaker": %s, "retry_after": '
                                          % json.dumps(breaker)).encode()
    if retry_after is None:
        body = prefix + b"null}"
        extra = b""
    else:
        body = prefix + repr(rounded).encode() + b"}"
        extra = b"Retry-After: " + outcome.retry_after_header(retry_after).encode() + b"\r\n"
    head = (_OPEN_HEAD + str(len(body)).encode() + b"\r\n" + extra + date_line()
            + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"))
    answer = head if head_only else head + body
    _OPEN_LAST[breaker] = (key, answer)
    return answer
