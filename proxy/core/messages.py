"""The project's own request and answer types, for fallbacks and control-plane handlers.

A `Request` is what a handler may know of a client's request: method, target as sent,
headers, client address and the body (at hand, or to be read from a `BodySource`). An
`Answer` is what it gives back: status, headers, and a body or an async stream of chunks
(Server-Sent Events). The HTTP server turns one into the other on the wire; nothing here
knows of a framework, a socket or an event loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict

JSON = "application/json"


class BodySource(Protocol):
    """Where a request body not yet read comes from (the client connection)."""

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None when it is larger than `limit` bytes (the rest is dropped)."""
        ...


class Request:
    """One client request as a handler sees it."""

    __slots__ = ("method", "target", "headers", "client_ip", "scheme", "body", "source", "detail",
                 "match")

    def __init__(self, method: str, target: str, headers: CIMultiDict[str], *,
                 client_ip: str | None = None, scheme: str = "http", body: bytes | None = None,
                 source: BodySource | None = None) -> None:
        self.method = method
        self.target = target  # path and query exactly as the client sent them
        self.headers = headers
        self.client_ip = client_ip
        self.scheme = scheme
        self.body = body  # the whole body when it is at hand (b"": none)
        self.source = source  # else where to read it from
        self.detail: str | None = None  # what the fallback_logs row says (a queue id, a cache age)
        self.match: dict[str, str] = {}  # path parameters a control-plane route matched

    @property
    def path(self) -> str:
        """The raw path (percent-encoding kept), without the query."""
        return self.target.partition("?")[0]

    @property
    def query_string(self) -> str:
        return self.target.partition("?")[2]

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(parse_qsl(self.query_string, keep_blank_values=True))

    @property
    def host(self) -> str | None:
        return self.headers.get("Host")

    @property
    def has_body(self) -> bool:
        return bool(self.body) or self.source is not None

    async def read(self, limit: int) -> bytes | None:
        """The whole body (b"" when there is none), or None when it is over `limit` bytes."""
        if self.body is not None:
            return self.body if len(self.body) <= limit else None
        if self.source is None:
            return b""
        body = await self.source.read(limit)
        if body is not None:
            self.body = body
            self.source = None
        return body


class Answer:
    """A response a handler or fallback gives: a whole body, or a stream of chunks."""

    __slots__ = ("status", "headers", "body", "stream")

    def __init__(self, status: int, body: bytes = b"", headers: Any = None, *,
                 content_type: str | None = None, stream: AsyncIterator[bytes] | None = None) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict(headers or ())
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.body = body
        self.stream = stream  # when set, the body is sent as it comes (chunked), `body` unused

    @classmethod
    def json(cls, status: int, document: Any, headers: Any = None) -> Answer:
        answer = cls(status, json.dumps(document).encode(), headers)
        answer.headers["Content-Type"] = JSON
        return answer

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:60]!r})"
