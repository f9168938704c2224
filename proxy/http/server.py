"""The proxy's HTTP/1.1 listener: one `ClientConnection` per client, every request parsed by
llhttp and served on its own connection (proxied by an `Exchange`, reserved paths by the
control plane), deadlines swept, idle connections closed, and a bounded drain at shutdown.

The server knows the registry (to route), the control plane (an object with
`async handle(Request) -> Answer`), and what its exchanges share (`ExchangeEnv`); it never
imports the app that wires them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy.config.model import ServerSettings
from proxy.http import wire
from proxy.http.connection import ClientConnection
from proxy.http.control_call import ControlPlane
from proxy.http.deadlines import Deadlines
from proxy.http.exchange import ExchangeEnv
from proxy.http.head import HttpError
from proxy.http.upstream import UpstreamPool
from proxy.runtime.registry import Registry

log = logging.getLogger(__name__)

IDLE_SWEEP_S = 5.0


class Server:
    scheme = "http"

    def __init__(self, settings: ServerSettings, registry: Registry, control: ControlPlane,
                 env: ExchangeEnv) -> None:
        self.loop = env.loop
        self.registry = registry
        self.control = control
        self.env = env
        self.max_body_bytes = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        self.max_line = max(8190, settings.max_header_bytes * 4)  # the request line's own allowance
        self.drain_timeout_s = settings.drain_timeout_s
        self.keepalive_s = 75.0
        self.access_log = logging.getLogger("proxy.access") if settings.access_log else None
        self.connections: set[ClientConnection] = set()
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.env.draining

    async def listen(self, host: str, port: int, *, reuse_address: bool = True, backlog: int = 1024) -> None:
        self._server = await self.loop.create_server(lambda: ClientConnection(self), host, port,
                                                     reuse_address=reuse_address, backlog=backlog)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.call_later(IDLE_SWEEP_S, self._sweep)

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def refusal(self, error: HttpError) -> bytes:
        return wire.refusal(error.status, error.detail, max_body_bytes=self.max_body_bytes,
                            max_header_bytes=self.max_header_bytes)

    def _sweep(self) -> None:
        """Close connections idle (no request in progress) for longer than keepalive_s."""
        limit = self.loop.time() - self.keepalive_s
        for connection in list(self.connections):
            if connection.handler is None and connection.idle_since < limit:
                connection.close()
        self._sweeper = self.loop.call_later(IDLE_SWEEP_S, self._sweep)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop listening, let in-flight requests finish (bounded), close the rest."""
        timeout = self.drain_timeout_s if timeout is None else timeout
        self.env.draining = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            if connection.handler is None:
                connection.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except TimeoutError:
                pass
            self._server = None


def make_env(loop: asyncio.AbstractEventLoop, clock: Any, **kwargs: Any) -> ExchangeEnv:
    """What every exchange shares: the upstream pool and the deadline sweeper, one each."""
    return ExchangeEnv(loop, UpstreamPool(loop), Deadlines(loop), clock, **kwargs)
