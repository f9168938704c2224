"""The only place that wires the parts together: one `App` per process (or per test).

`App(settings)` builds the registry, metrics, storage, fallbacks and the control plane;
`await app.start(host, port)` opens storage, puts stored breaker states back, starts the
replay workers, the probes, the control plane's tasks and then the HTTP server;
`await app.close()` drains the server (bounded) and stops everything in the reverse order,
storage last.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable

from proxy.config.model import Settings
from proxy.core.clock import Clock, SystemClock
from proxy.fallbacks.build import FallbackDeps, build_fallback
from proxy.fallbacks.cache_store import CacheStore
from proxy.fallbacks.log import FallbackLog
from proxy.fallbacks.queue import QueueBook
from proxy.http.client import UpstreamClient
from proxy.http.server import Server, make_env
from proxy.http.tls import client_contexts
from proxy.ops.control import ControlPlane
from proxy.ops.status import Scenarios
from proxy.runtime.cluster import Cluster
from proxy.runtime.metrics import Metrics
from proxy.runtime.persistence import Persistence
from proxy.runtime.probes import Prober
from proxy.runtime.registry import Registry, ReloadResult, RouteRuntime
from proxy.storage import database_url, storage_for

log = logging.getLogger(__name__)


class App:
    def __init__(self, settings: Settings, *, clock: Clock | None = None,
                 rng: random.Random | None = None, admin_token: str | None = None,
                 scenarios: Scenarios | None = None) -> None:
        """`scenarios`: the demo's, started from the status page (`circuit-proxy demo`)."""
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        # SQLite, or the fleet's PostgreSQL (§8); the URL may come from the environment.
        self.storage = storage_for(settings.storage, os.environ)
        # This proxy's name in the fleet: its queue leases and its rows of the shared breakers.
        self.node_id = settings.cluster.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.queues = QueueBook(self.storage, self.clock, self.metrics, node_id=self.node_id)
        self.cache_store = CacheStore(self.storage, self.clock)
        deps = FallbackDeps(clock=self.clock, fallback_dir=settings.fallback_dir, storage=self.storage,
                            metrics=self.metrics, queues=self.queues, cache_store=self.cache_store)
        self.registry = Registry(settings, self.clock, self.metrics,
                                 lambda route, upstream: build_fallback(route, deps), rng=rng)
        deps.registry = self.registry
        self.queues.attach(self.registry)
        self.fallback_log = FallbackLog(self.storage, self.clock)
        self.persistence = Persistence(self.registry, self.storage, self.metrics)
        # §8: breakers shared with the fleet through PostgreSQL, on a connection of its own.
        self.cluster = (Cluster(settings, self.registry, self.clock, self.metrics, node_id=self.node_id,
                                url=database_url(settings.storage, os.environ))
                        if settings.cluster.share_breakers else None)
        # Routes with `probe` recover without customer traffic: the proxy sends the trials.
        self.prober = Prober(self.registry, self.clock)
        self.control = ControlPlane(settings, self.registry, self.metrics, queues=self.queues.statuses,
                                    admin_token=admin_token, queue_book=self.queues, storage=self.storage,
                                    scenarios=scenarios)
        self.reloader = self.control.reloader
        self.reloader.add_listener(self.persistence.on_reload)
        self.reloader.add_listener(self.prober.on_reload)
        self.reloader.add_listener(self._on_reload)
        self._tls: dict[str, ssl.SSLContext] = {}
        self._tls_by_service(settings)
        self.server: Server | None = None
        self._closed = False

    def _tls_by_service(self, settings: Settings) -> None:
        """One TLS context per https upstream, rebuilt when the config is (§1a)."""
        contexts = client_contexts(settings.services)
        self._tls = {service.upstream: contexts[service.name] for service in settings.services
                     if service.name in contexts}

    def _on_reload(self, settings: Settings, result: ReloadResult) -> None:
        self.settings = settings
        self._tls_by_service(settings)

    def tls_for(self, runtime: RouteRuntime) -> ssl.SSLContext | None:
        return self._tls.get(runtime.upstream)

    def url(self, path: str = "/") -> str:
        assert self.server is not None
        return self.server.url(path)

    async def start(self, host: str, port: int, *, before_listen: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        # Storage opens first and closes last: everything else may write to it.
        await self.storage.open()
        # Stored breaker states are back before anything is served or replayed (§6).
        await self.persistence.start()
        if self.cluster is not None:  # in step with the fleet before the first request
            await self.cluster.start()
            self.control.board.cluster = self.cluster.status
            self.reloader.add_listener(self.cluster.on_reload)
        # Last-known-good answers are back too, with their true age (§5 cache).
        await self.cache_store.restore()
        self.cache_store.start()
        env = make_env(loop, self.clock, fallback_log=self.fallback_log, tls_for=self.tls_for,
                       upstream_max_connections=self.settings.server.upstream_max_connections)
        self.queues.client = UpstreamClient(env.pool, env.deadlines, tls_for=lambda url: self._tls.get(url))
        self.prober.client = self.queues.client  # the same pooled client as queue replay
        await self.queues.start()
        self.prober.start()
        await self.control.start()
        self.server = Server(self.settings.server, self.registry, self.control, env)
        if before_listen is not None:
            before_listen()
        await self.server.listen(host, port)

    async def close(self) -> None:
        """Drain, then stop in the reverse order of `start` (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        server = self.server
        # An open status page must not hold up the drain.
        self.control.close_streams()
        if server is not None:
            await server.shutdown()
        await self.control.stop()
        await self.prober.stop()
        await self.queues.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.persistence.stop()
        await self.cache_store.stop()  # what the last requests taught is written too
        if server is not None:
            server.env.deadlines.close()
            server.env.pool.close()
        await self.storage.close()  # writes what is still buffered
