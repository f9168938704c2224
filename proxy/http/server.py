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
import resource
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

RESERVED_FDS = 64  # storage, logs, listeners, webhooks: what is not a client or upstream socket
REFUSAL_LOG_INTERVAL_S = 1.0


def fit_open_files(wanted: int) -> int:
    """Raise this process's open-file limit as far as the system allows, and the number of
    client connections that fit in it: each may hold an upstream connection too (§1a).
    A privileged process (root, CAP_SYS_RESOURCE) may raise the hard limit itself, up to
    the kernel's `fs.nr_open`; any other raises its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + RESERVED_FDS
    if hard != resource.RLIM_INFINITY and hard < need:
        ceiling = min(need, _kernel_file_ceiling())
        if ceiling > hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
                log.info("open-file limit raised from %d to %d", soft, ceiling)
                soft = hard = ceiling
            except (ValueError, OSError):
                pass  # not privileged: the soft limit can still go up to the hard one
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays %d: %s", soft, exc)
    fits = max(1, (soft - RESERVED_FDS) // 2)
    if wanted > fits:
        log.warning("max_connections lowered from %d to %d to fit the open-file limit (%d)",
                    wanted, fits, soft)
        return fits
    return wanted


def _kernel_file_ceiling() -> int:
    """The most open files the kernel lets one process have (Linux `fs.nr_open`)."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as file:  # noqa: PTH123  (start-up only)
            return int(file.read().strip())
    except (OSError, ValueError):
        return 1 << 20


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
        self.header_timeout_s = settings.header_timeout_ms / 1000
        self.body_timeout_s = settings.body_timeout_ms / 1000
        self.keepalive_s = settings.idle_timeout_ms / 1000
        self.max_connections = settings.max_connections
        # The sweep sees a stalled head or body, or an idle connection, at most this late.
        self.sweep_s = min(1.0, max(0.02, min(self.header_timeout_s, self.body_timeout_s,
                                              self.keepalive_s) / 5))
        self.refused_connections = 0
        self._refusal_logged = 0.0
        self.access_log = logging.getLogger("proxy.access") if settings.access_log else None
        self.connections: set[ClientConnection] = set()
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def draining(self) -> bool:
        return self.env.draining

    async def listen(self, host: str, port: int, *, reuse_address: bool = True,
                     backlog: int | None = None) -> None:
        """`backlog`: connections the kernel may hold before they are accepted; by default
        room for `max_connections` arriving at once (the kernel caps it at somaxconn)."""
        self.max_connections = fit_open_files(self.max_connections)
        backlog = backlog or max(1024, self.max_connections)
        self._server = await self.loop.create_server(lambda: ClientConnection(self), host, port,
                                                     reuse_address=reuse_address, backlog=backlog)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

    def url(self, path: str = "/") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def refusal(self, error: HttpError) -> bytes:
        return wire.refusal(error.status, error.detail, max_body_bytes=self.max_body_bytes,
                            max_header_bytes=self.max_header_bytes)

    def refuse_connection(self) -> None:
        """One connection more than max_connections: closed at once, said at most once a second."""
        self.refused_connections += 1
        now = self.loop.time()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged = now
            log.warning("connection refused: max_connections (%d) are open (%d refused so far)",
                        self.max_connections, self.refused_connections)

    def _sweep(self) -> None:
        """Heads and bodies that stalled get 408, idle connections are closed (§1a): one pass
        over the connections, no timer per connection."""
        now = self.loop.time()
        for connection in list(self.connections):
            connection.check_timeouts(now)
        self._sweeper = self.loop.call_later(self.sweep_s, self._sweep)

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


def make_env(loop: asyncio.AbstractEventLoop, clock: Any, *, upstream_max_connections: int = 0,
             **kwargs: Any) -> ExchangeEnv:
    """What every exchange shares: the upstream pool and the deadline sweeper, one each."""
    pool = UpstreamPool(loop, max_per_upstream=upstream_max_connections)
    return ExchangeEnv(loop, pool, Deadlines(loop), clock, **kwargs)
