"""HTTP/1.1 message heads and chunked bodies, parsed strictly (RFC 9112), for the fast server.

Pure: no asyncio, aiohttp, SQLite or Prometheus; bytes in, values or `HttpError` out. Strict
on purpose: what a proxy forwards must mean the same to the upstream as it meant here, so
anything ambiguous (both Content-Length and Transfer-Encoding, more than one Content-Length,
CR or LF inside a value, obsolete line folding, a transfer coding other than `chunked`,
whitespace before a colon, bytes that are not allowed in a field) is refused with 400 and
never forwarded (§4).
"""

from __future__ import annotations

import re

# token (RFC 9110 §5.6.2) ":" field-value made of HTAB, SP, VCHAR and obs-text, then CRLF.
# One linear pass over the whole header section; no CR, LF, NUL or other CTL can hide in a value.
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([!-~]+) HTTP/1\.([01])")
_OTHER_VERSION = re.compile(rb"[!-~]+ [!-~]+ HTTP/[0-9]\.[0-9]")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[\t ]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host", b"expect"})
_RESPONSE_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class HttpError(Exception):
    """A message this side refuses: `status` for the answer, `detail` for its body."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


Field = tuple[bytes, bytes, bytes]  # (name as sent, lower-case name, value without OWS)


class RequestHead:
    """One parsed request head. `content_length` is None without the header; `chunked` means
    a chunked body; neither means no body (§6.3 of RFC 9112)."""

    __slots__ = ("method", "target", "http11", "fields", "content_length", "chunked", "keep_alive",
                 "host", "expect_continue", "connection_tokens", "size")

    def __init__(self, method: bytes, target: bytes, http11: bool, fields: list[Field],
                 content_length: int | None, chunked: bool, keep_alive: bool, host: bytes | None,
                 expect_continue: bool, connection_tokens: frozenset[bytes] | None, size: int) -> None:
        self.method = method
        self.target = target
        self.http11 = http11
        self.fields = fields
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.host = host
        self.expect_continue = expect_continue
        self.connection_tokens = connection_tokens
        self.size = size  # bytes of the header section (what max_header_bytes limits)


def split_fields(section: bytes) -> list[Field]:
    """`section` is the header section up to and including its last CRLF, already checked."""
    fields = []
    for line in section.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        fields.append((name, name.lower(), value.strip(b" \t")))
    return fields


def tokens(value: bytes) -> list[bytes]:
    return [token for token in (part.strip(b" \t").lower() for part in value.split(b",")) if token]


def split_head(head: bytes) -> tuple[bytes, bytes]:
    """(start line, header section with each field ending in CRLF) of a head without its blank line."""
    line_end = head.find(b"\r\n")
    if line_end < 0:
        return head, b""
    return head[:line_end], head[line_end + 2:] + b"\r\n"


def parse_request_head(head: bytes, max_header_bytes: int) -> RequestHead:
    """`head` is everything before the blank line (request line, CRLF, fields without the
    final CRLF). Raises HttpError (400, 417, 431, 505)."""
    line, section = split_head(head)
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if _OTHER_VERSION.fullmatch(line):
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "malformed request line")
    if len(section) > max_header_bytes:
        raise HttpError(431, "header section too large")
    if _FIELDS.fullmatch(section) is None:
        raise HttpError(400, "malformed header field")
    method, target, minor = match.groups()
    http11 = minor == b"1"
    fields = split_fields(section)
    content_length: int | None = None
    chunked = False
    transfer_coding = False
    host: bytes | None = None
    expect_continue = False
    connection: set[bytes] | None = None
    for _, lname, value in fields:
        if lname not in _FRAMING:
            continue
        if lname == b"content-length":
            if content_length is not None:
                raise HttpError(400, "more than one Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise HttpError(400, "malformed Content-Length")
            content_length = int(value)
        elif lname == b"transfer-encoding":
            if transfer_coding or value.lower() != b"chunked":
                raise HttpError(400, "unsupported Transfer-Encoding")
            transfer_coding = chunked = True
        elif lname == b"connection":
            connection = connection or set()
            connection.update(tokens(value))
        elif lname == b"host":
            if host is not None:
                raise HttpError(400, "more than one Host")
            host = value
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise HttpError(417, "unsupported expectation")
            expect_continue = True
    if content_length is not None and transfer_coding:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if transfer_coding and not http11:
        raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
    if http11:
        keep_alive = connection is None or b"close" not in connection
    else:
        keep_alive = False  # HTTP/1.0: one request per connection, always (simple and safe)
    return RequestHead(method, target, http11, fields, content_length, chunked, keep_alive, host,
                       expect_continue and http11, frozenset(connection) if connection else None,
                       len(section))


class ResponseHead:
    __slots__ = ("status", "reason", "http11", "fields", "content_length", "chunked", "keep_alive",
                 "connection_tokens")

    def __init__(self, status: int, reason: bytes, http11: bool, fields: list[Field],
                 content_length: int | None, chunked: bool, keep_alive: bool,
                 connection_tokens: frozenset[bytes] | None) -> None:
        self.status = status
        self.reason = reason
        self.http11 = http11
        self.fields = fields
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.connection_tokens = connection_tokens


def parse_response_head(head: bytes) -> ResponseHead:
    """An upstream's response head (without the blank line). Raises HttpError(502, …)."""
    line, section = split_head(head)
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise HttpError(502, "malformed status line from the upstream")
    if _FIELDS.fullmatch(section) is None:
        raise HttpError(502, "malformed header field from the upstream")
    minor, status, reason = match.groups()
    http11 = minor == b"1"
    fields = split_fields(section)
    content_length: int | None = None
    chunked = False
    connection: set[bytes] | None = None
    for _, lname, value in fields:
        if lname not in _RESPONSE_FRAMING:
            continue
        if lname == b"content-length":
            if content_length is None and value.isdigit() and len(value) <= 18:
                content_length = int(value)  # the usual case
                continue
            # Identical repeats (or a list of one value repeated) are harmless; others are not.
            values = {v.strip(b" \t") for v in value.split(b",")}
            if len(values) != 1:
                raise HttpError(502, "conflicting Content-Length from the upstream")
            (single,) = values
            if not single.isdigit() or len(single) > 18:
                raise HttpError(502, "malformed Content-Length from the upstream")
            length = int(single)
            if content_length is not None and length != content_length:
                raise HttpError(502, "conflicting Content-Length from the upstream")
            content_length = length
        elif lname == b"transfer-encoding":
            codings = tokens(value)
            if codings and codings[-1] == b"chunked":
                chunked = True
                if len(codings) > 1:
                    raise HttpError(502, "unsupported Transfer-Encoding from the upstream")
            else:
                raise HttpError(502, "unsupported Transfer-Encoding from the upstream")
        else:
            connection = connection or set()
            connection.update(tokens(value))
    if chunked:
        content_length = None  # RFC 9112 §6.3: chunked wins; the length is not used
    keep_alive = (connection is None or b"close" not in connection) if http11 else (
        connection is not None and b"keep-alive" in connection)
    return ResponseHead(int(status), reason or b"", http11, fields, content_length, chunked,
                        keep_alive, frozenset(connection) if connection else None)


class ChunkedDecoder:
    """Incremental decoder of the chunked transfer coding (RFC 9112 §7.1).

    `feed(data)` returns the decoded pieces; once the last chunk and the trailer section have
    been read, `done` is True and `rest` holds the bytes that followed the body. Raises
    HttpError(400) on anything malformed, or HttpError(413) past `limit` decoded bytes.
    Trailer fields are read and dropped.
    """

    __slots__ = ("_state", "_left", "_pending", "done", "rest", "size", "limit")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)
    MAX_LINE = 4096

    def __init__(self, limit: int | None = None) -> None:
        self._state = self._SIZE
        self._left = 0
        self._pending = b""
        self.done = False
        self.rest = b""
        self.size = 0
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out: list[bytes] = []
        at = 0
        end = len(data)
        while at < end:
            state = self._state
            if state == self._DATA:
                take = min(self._left, end - at)
                out.append(data[at:at + take] if take != end - at or at else data)
                at += take
                self._left -= take
                if self._left == 0:
                    self._state = self._DATA_END
            elif state == self._DATA_END:
                if end - at < 2:
                    break
                if data[at:at + 2] != b"\r\n":
                    raise HttpError(400, "malformed chunked body")
                at += 2
                self._state = self._SIZE
            else:
                line_end = data.find(b"\r\n", at)
                if line_end < 0:
                    if end - at > self.MAX_LINE:
                        raise HttpError(400, "chunk line too long")
                    break
                line = data[at:line_end]
                at = line_end + 2
                if state == self._SIZE:
                    match = _CHUNK_SIZE.fullmatch(line)
                    if match is None:
                        raise HttpError(400, "malformed chunk size")
                    size = int(match.group(1), 16)
                    self.size += size
                    if self.limit is not None and self.size > self.limit:
                        raise HttpError(413, "chunked body too large")
                    if size:
                        self._left = size
                        self._state = self._DATA
                    else:
                        self._state = self._TRAILER
                else:  # trailer section: fields until an empty line
                    if not line:
                        self.done = True
                        self.rest = data[at:]
                        return out
                    if _FIELDS.fullmatch(line + b"\r\n") is None:
                        raise HttpError(400, "malformed trailer field")
        if at < end:
            self._pending = data[at:]
        return out


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
