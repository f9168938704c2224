"""One fake service on its own port: the listener, its connections, the mode in force.

`ServiceServer` owns the asyncio listening socket itself (not a `web.TCPSite`) so that
`down` can close the listener *and* every open keep-alive connection, and a later mode
can re-open the listener on the same port. Modes are decided by `modes.ModeState`
and carried out here, in a middleware that runs before the service's own handlers.
Handlers are cancelled when their connection goes (`handler_cancellation=True`): a
hung request ends when the client gives up, the mode changes, or the server stops.
A slow request is the exception, as with a real slow upstream: its work runs in a
shielded task and completes after `latency_ms` even if the client has gone, so a client
timeout does not mean nothing happened (§4, Idempotency-Key). `down` and stop
cancel that work: the server "died" with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final, NoReturn

from aiohttp import web

from .modes import Action, Mode, ModeSpec, ModeState
from .services import Handler, Service, json_errors

log = logging.getLogger(__name__)

Clock = Callable[[], float]
SHUTDOWN_TIMEOUT_S: Final = 2.0  # bound on waiting for in-flight handlers at stop
CLOSE_TIMEOUT_S: Final = 1.0  # bound on waiting for a closed listener's last sockets


def format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def drop_connection(request: web.BaseRequest) -> NoReturn:
    """Close the connection without an answer, then wait to be cancelled.

    aiohttp's `connection_lost` cancels this handler (handler_cancellation), so nothing
    is ever written and no "Error handling request" is logged.
    """
    protocol = request.protocol
    if protocol is not None:
        protocol.force_close()
    await asyncio.Event().wait()
    raise AssertionError("unreachable: the handler is cancelled when its connection closes")


async def _after(delay_s: float, handler: Handler, request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(delay_s)
    return await handler(request)


class Listener:
    """A listening socket for an aiohttp low-level server that can close and re-open."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port  # 0 until the first open picks an ephemeral port
        self._server: asyncio.Server | None = None

    @property
    def is_open(self) -> bool:
        return self._server is not None

    async def open(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        assert self._runner.server is not None, "runner.setup() first"
        self._server = await loop.create_server(
            self._runner.server, self.host, self.port, reuse_address=True
        )
        if self.port == 0:
            # Re-opening after `down` must use the same port: remember the one we got.
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every open connection (new connects are refused)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()
        if server is not None:
            try:
                # From 3.12 this also waits for connections, one accepted just now included.
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await server.wait_closed()
            except TimeoutError:
                log.debug("listener on port %s: connections still closing", self.port)


class ServiceServer:
    """A `Service` behind a listener, answering according to its current mode."""

    def __init__(
        self, service: Service, host: str, port: int, clock: Clock = time.monotonic
    ) -> None:
        self.service = service
        self._clock = clock
        self._state = ModeState(ModeSpec(), clock())
        self._hang_over = asyncio.Event()  # set when a hang period ends
        self._lock = asyncio.Lock()  # one mode change (listener open/close) at a time
        self._slow_work: set[asyncio.Task[web.StreamResponse]] = set()
        app = web.Application(middlewares=[self._apply_mode, json_errors])
        app.add_routes(service.routes())
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        self._listener = Listener(self._runner, host, port)

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def url(self) -> str:
        return format_url(self._listener.host, self._listener.port)

    @property
    def mode(self) -> ModeSpec:
        return self._state.spec

    def describe(self) -> dict[str, Any]:
        """This service's entry in `GET /services`."""
        entry: dict[str, Any] = {
            **self.mode.as_dict(),
            "port": self.port,
            "url": self.url,
            "requests": self.service.requests,
            "recorded": len(self.service.records),
            "listening": self._listener.is_open,
        }
        if self.mode.mode is Mode.FLAP:
            entry["phase"] = self._state.flap_phase(self._clock()).value
        return entry

    async def start(self) -> None:
        await self._runner.setup()
        try:
            await self._listener.open()
        except BaseException:
            await self._runner.cleanup()
            raise
        log.info("%s listening on %s", self.name, self.url)

    async def stop(self) -> None:
        async with self._lock:
            self._end_hang()
            self._cancel_slow_work()
            await self._listener.close()
            await self._runner.cleanup()

    async def set_mode(self, spec: ModeSpec) -> None:
        async with self._lock:
            previous = self._state.spec
            self._state = ModeState(spec, self._clock())
            if spec.mode is not Mode.HANG:
                self._end_hang()
            if spec.mode is Mode.DOWN:
                self._cancel_slow_work()
                await self._listener.close()
            else:
                await self._listener.open()
        log.info("%s: mode %s -> %s", self.name, previous.as_dict(), spec.as_dict())

    async def reset(self) -> None:
        """Healthy again, with no records and a request count of 0."""
        await self.set_mode(ModeSpec())
        self._cancel_slow_work()  # or a late answer would record after the reset
        self.service.reset()

    def _end_hang(self) -> None:
        self._hang_over.set()
        self._hang_over = asyncio.Event()

    def _cancel_slow_work(self) -> None:
        for task in list(self._slow_work):
            task.cancel()

    async def _answer_late(
        self, request: web.Request, handler: Handler, delay_s: float
    ) -> web.StreamResponse:
        """Answer after `delay_s`; the work is done even if the client leaves meanwhile."""
        await request.read()  # the whole body, before the client can go (cached by aiohttp)
        work = asyncio.create_task(_after(delay_s, handler, request))
        self._slow_work.add(work)
        work.add_done_callback(self._slow_work_done)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the client left: the work goes on
                raise
            await drop_connection(request)  # down, reset or stop cancelled the work

    def _slow_work_done(self, work: asyncio.Task[web.StreamResponse]) -> None:
        self._slow_work.discard(work)
        if not work.cancelled() and work.exception() is not None:
            log.error("%s: slow request failed", self.name, exc_info=work.exception())

    @web.middleware
    async def _apply_mode(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.service.requests += 1  # every request that reached us, whatever the mode
        decision = self._state.decide(self._clock())
        if decision.action is Action.ERROR:
            return self._injected_error(decision.status or 500)
        if decision.action is Action.DELAY:
            return await self._answer_late(request, handler, decision.delay_s)
        if decision.action is Action.HANG:
            await self._hang_over.wait()
            await drop_connection(request)
        elif decision.action is Action.DROP:
            await drop_connection(request)
        return await handler(request)

    def _injected_error(self, status: int) -> web.Response:
        body = {
            "error": "injected_failure",
            "message": f"{self.name} is in mode {self.mode.mode.value}",
            "service": self.name,
            "status": status,
        }
        return web.json_response(body, status=status)
