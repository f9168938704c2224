"""Request and response heads as the exchange needs them, built from llhttp's callbacks.

llhttp (through `httptools`, with no leniency flags) does the parsing and refuses what is
malformed or ambiguous: both Content-Length and Transfer-Encoding, differing Content-Lengths,
CR or LF inside a value, obsolete line folding, whitespace before a colon. On top of it this
module refuses what a proxy must not pass on even when it parses (§4): a transfer coding other
than `chunked`, Transfer-Encoding in HTTP/1.0, a second Host, an expectation other than
100-continue, a header section over `max_header_bytes`. Pure: bytes in, values or `HttpError`.
"""

from __future__ import annotations

Field = tuple[bytes, bytes, bytes]  # (name as sent, lower-case name, value)

_REQUEST_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host", b"expect"})
_RESPONSE_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class HttpError(Exception):
    """A message this side refuses: `status` for the answer, `detail` for its body."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def tokens(value: bytes) -> list[bytes]:
    return [token for token in (part.strip(b" \t").lower() for part in value.split(b",")) if token]


class RequestHead:
    """One request head. `content_length` is None without the header; `chunked` means a
    chunked body; neither means no body (RFC 9112 §6.3)."""

    __slots__ = ("method", "target", "http11", "fields", "content_length", "chunked", "keep_alive",
                 "host", "expect_continue", "connection_tokens", "upgrade", "has_body")

    def __init__(self, method: bytes, target: bytes, http11: bool, fields: list[Field],
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.http11 = http11
        self.fields = fields
        # Locals while scanning (made on every request): each set once at the end.
        content_length: int | None = None
        chunked = False
        host: bytes | None = None
        expect_continue = False
        connection: set[bytes] | None = None
        for _, lname, value in fields:
            if lname not in _REQUEST_FRAMING:
                continue
            if lname == b"content-length":
                content_length = int(value)  # llhttp checked it is one number, once
            elif lname == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    raise HttpError(400, "unsupported Transfer-Encoding")
                if not http11:
                    raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
                chunked = True
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
                expect_continue = http11
        self.content_length = content_length
        self.chunked = chunked
        self.host = host
        self.expect_continue = expect_continue
        upgrade = False
        if connection:
            self.connection_tokens: frozenset[bytes] | None = frozenset(connection)
            upgrade = b"upgrade" in connection
        else:
            self.connection_tokens = None
        self.upgrade = upgrade
        # HTTP/1.0: one request per connection, always (simple and safe).
        self.keep_alive = keep_alive and http11 and not upgrade
        self.has_body = chunked or bool(content_length)


class ResponseHead:
    __slots__ = ("status", "reason", "fields", "content_length", "chunked", "keep_alive",
                 "connection_tokens")

    def __init__(self, status: int, reason: bytes, fields: list[Field], keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.fields = fields
        self.keep_alive = keep_alive
        content_length: int | None = None
        chunked = False
        connection: set[bytes] | None = None
        for _, lname, value in fields:
            if lname not in _RESPONSE_FRAMING:
                continue
            if lname == b"content-length":
                content_length = int(value)
            elif lname == b"transfer-encoding":
                codings = tokens(value)
                if codings != [b"chunked"]:
                    raise HttpError(502, "unsupported Transfer-Encoding from the upstream")
                chunked = True
            else:
                connection = connection or set()
                connection.update(tokens(value))
        self.content_length = content_length
        self.chunked = chunked
        self.connection_tokens = frozenset(connection) if connection else None
