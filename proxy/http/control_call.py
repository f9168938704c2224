"""A request to a reserved path (§2), answered by the control plane on the same connection.

The control plane (status page, /status.json, /status/events, /metrics, /healthz, /admin/…)
is called in-process with the project's own `Request` and gives an `Answer`; a streamed
answer (Server-Sent Events) is written chunk by chunk as it comes, waiting while the client
is slow to read, and its stream is closed when the client goes away or the answer ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict

from proxy.core.messages import Answer, Request
from proxy.http import wire
from proxy.http.body import BodyReader
from proxy.http.head import RequestHead

if TYPE_CHECKING:
    from proxy.http.connection import ClientConnection
    from proxy.http.server import Server

log = logging.getLogger(__name__)


class ControlPlane(Protocol):
    async def handle(self, request: Request) -> Answer: ...


class ControlCall:
    __slots__ = ("server", "client", "head", "reader", "task", "done", "request_done")

    def __init__(self, server: Server, client: ClientConnection, head: RequestHead) -> None:
        self.server = server
        self.client = client
        self.head = head
        self.reader = BodyReader() if head.has_body else None
        self.request_done = not head.has_body
        self.task: asyncio.Task[None] | None = None
        self.done = False

    def start(self) -> None:
        head = self.head
        headers = CIMultiDict((name.decode("latin-1"), value.decode("latin-1"))
                              for name, _, value in head.fields)
        peer = self.client.peer_ip
        request = Request(head.method.decode("latin-1"), head.target.decode("latin-1"), headers,
                          client_ip=peer.decode() if peer else None, source=self.reader)
        self.task = self.server.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            answer = await self.server.control.handle(request)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            answer = Answer.json(500, {"error": "internal_error"})
        if self.done:
            return
        head_only = self.head.method == b"HEAD"
        keep_alive = (self.head.keep_alive and not self.server.draining
                      and (self.request_done or self.client.can_discard()))
        if answer.stream is None:
            self.client.write(wire.answer_bytes(answer, keep_alive=keep_alive, head_only=head_only))
        else:
            keep_alive = keep_alive and self.head.http11
            await self._stream(answer, keep_alive, head_only)
            if self.done:
                return
        self.done = True
        self.task = None
        self.client.exchange_done(self, keep_alive=keep_alive)

    async def _stream(self, answer: Answer, keep_alive: bool, head_only: bool) -> None:
        client = self.client
        chunked = self.head.http11
        client.write(wire.answer_head(answer, keep_alive=keep_alive, length=None if chunked else 0)
                     if chunked else _close_delimited_head(answer))
        stream: Any = answer.stream
        try:
            if not head_only:
                async for chunk in stream:
                    if self.done or client.lost:
                        return
                    client.write(wire.encode_chunk(chunk) if chunked else chunk)
                    await client.drain()
            if chunked and not client.lost:
                client.write(wire.LAST_CHUNK)
        finally:
            await stream.aclose()

    # -- the request body: read by the handler if it wants it, else dropped --------------------

    def on_request_body(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)

    def on_request_end(self) -> None:
        self.request_done = True
        if self.reader is not None:
            self.reader.end()

    def on_request_broken(self, status: int, answer: bytes) -> None:
        self._stop()
        self.client.write(answer)
        self.client.exchange_done(self, keep_alive=False)

    def on_client_lost(self) -> None:
        self._stop()

    def on_client_writable(self) -> None:
        pass  # the stream waits in `drain`

    def _stop(self) -> None:
        if self.done:
            return
        self.done = True
        if self.reader is not None:
            self.reader.fail()
        if self.task is not None:
            self.task.cancel()
            self.task = None


def _close_delimited_head(answer: Answer) -> bytes:
    """An HTTP/1.0 client gets a streamed answer that ends when the connection closes."""
    head = wire.answer_head(answer, keep_alive=False, length=0)
    return head.replace(b"Content-Length: 0\r\n", b"")
