"""`FakeUpstreams`: the four fake services plus the control API, started and stopped together.

The control server (§7) listens on the base port and the services on the next
four (or every one on an ephemeral port when the base port is 0). Tests and
`circuit-proxy demo` drive the same object directly: `set_mode`, `reset`, `requests`,
`service(name).records`. The control API only translates HTTP to those calls; it never
touches a service's records or listener itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .modes import ModeError, ModeSpec, make_mode, parse_mode
from .page import DEFAULT_STATUS_URL, form_mode, render_page
from .server import SHUTDOWN_TIMEOUT_S, Clock, Listener, ServiceServer, format_url
from .services import SERVICE_CLASSES, SERVICE_NAMES, ApiError, Service, json_errors

log = logging.getLogger(__name__)


class UnknownServiceError(KeyError):
    """A service name that is not one of SERVICE_NAMES."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown service {self.name!r}: expected one of {', '.join(SERVICE_NAMES)}"


class FakeUpstreams:
    """The control server on `base_port`, payment … shipping on the next four ports."""

    def __init__(
        self, host: str = "127.0.0.1", base_port: int = 9100, *, clock: Clock = time.monotonic,
        status_url: str = DEFAULT_STATUS_URL,
    ) -> None:
        """`status_url`: the proxy's status page, linked from the control page."""
        self.host = host
        self.base_port = base_port
        self.status_url = status_url
        self._clock = clock
        self._servers: dict[str, ServiceServer] = {}
        self._control_runner: web.AppRunner | None = None
        self._control: Listener | None = None

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open every port; on any failure close what was opened and raise (OSError)."""
        try:
            await self._start_control()
            for offset, cls in enumerate(SERVICE_CLASSES, start=1):
                port = self.base_port + offset if self.base_port else 0
                server = ServiceServer(cls(), self.host, port, self._clock)
                await server.start()
                self._servers[cls.name] = server
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close every listener and connection, hung requests included; safe to repeat."""
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            await server.stop()
        runner, self._control_runner = self._control_runner, None
        if self._control is not None:
            await self._control.close()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeUpstreams:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _start_control(self) -> None:
        app = web.Application(middlewares=[json_errors])
        app[FAKES_KEY] = self
        app.add_routes(CONTROL_ROUTES)
        self._control_runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._control_runner.setup()
        self._control = Listener(self._control_runner, self.host, self.base_port)
        await self._control.open()
        log.info("control listening on %s", self.control_url)

    # -- addresses ----------------------------------------------------------------

    @property
    def control_port(self) -> int:
        if self._control is None:
            raise RuntimeError("FakeUpstreams is not started")
        return self._control.port

    @property
    def control_url(self) -> str:
        return format_url(self.host, self.control_port)

    def port(self, name: str) -> int:
        return self.server(name).port

    def url(self, name: str) -> str:
        return self.server(name).url

    def addresses(self) -> dict[str, str]:
        """`{"control": url, "payment": url, …}` in port order."""
        return {"control": self.control_url, **{n: s.url for n, s in self._servers.items()}}

    # -- state --------------------------------------------------------------------

    def service(self, name: str) -> Service:
        """The service itself: `.records` (arrival order), `.requests`."""
        return self.server(name).service

    def requests(self, name: str) -> int:
        """Requests that reached the service, whatever its mode."""
        return self.server(name).service.requests

    def mode(self, name: str) -> ModeSpec:
        return self.server(name).mode

    def describe(self) -> dict[str, dict[str, Any]]:
        """The body of `GET /services`."""
        return {name: server.describe() for name, server in self._servers.items()}

    async def set_mode(self, name: str, mode: str, **options: Any) -> dict[str, Any]:
        """`await fakes.set_mode("payment", "error", status=503)`; ModeError if invalid."""
        server = self.server(name)
        await server.set_mode(make_mode(mode, **options))
        return server.describe()

    async def reset(self, name: str | None = None) -> None:
        """Clear one service (or all): records, request count, mode back to healthy."""
        for server in [self.server(name)] if name else list(self._servers.values()):
            await server.reset()

    def server(self, name: str) -> ServiceServer:
        """The server hosting `name` (its listener and mode)."""
        try:
            return self._servers[name]
        except KeyError:
            if name in SERVICE_NAMES:
                raise RuntimeError("FakeUpstreams is not started") from None
            raise UnknownServiceError(name) from None


# -- control API (§7) ---------------------------------------------------

CONTROL_ROUTES = web.RouteTableDef()
FAKES_KEY = web.AppKey("fakes", FakeUpstreams)


def _fakes(request: web.Request) -> FakeUpstreams:
    return request.app[FAKES_KEY]


def _server(request: web.Request) -> ServiceServer:
    name = request.match_info["name"]
    try:
        return _fakes(request).server(name)
    except UnknownServiceError as exc:
        raise ApiError(404, "unknown_service", str(exc), service=name) from None


async def _reopening(server: ServiceServer, change: Awaitable[None]) -> None:
    """Apply a mode change; a port taken by someone else while down is a 500 that says so."""
    try:
        await change
    except OSError as exc:
        message = f"{server.name}: cannot listen on port {server.port} again: {exc}"
        raise ApiError(500, "cannot_listen", message) from None


@CONTROL_ROUTES.get("/")
async def page(request: web.Request) -> web.Response:
    fakes = _fakes(request)
    html = render_page(fakes.describe(), status_url=fakes.status_url, control_url=fakes.control_url,
                       notice=request.query.get("notice", ""), problem=request.query.get("problem", ""))
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def _back_to_page(**said: str) -> web.HTTPSeeOther:
    """After a form: 303 to the page, which says what happened (POST/redirect/GET)."""
    return web.HTTPSeeOther(location="/?" + urlencode(said))


@CONTROL_ROUTES.post("/page/services/{name}/mode")
async def page_set_mode(request: web.Request) -> web.Response:
    """The page's form: like `PUT /services/<name>/mode`, answered with a redirect to `/`."""
    name = request.match_info["name"]
    form = {key: str(value) for key, value in (await request.post()).items()}
    try:
        server = _fakes(request).server(name)
        spec = parse_mode(form_mode(form))
        await server.set_mode(spec)
    except (UnknownServiceError, ModeError) as exc:
        raise _back_to_page(problem=f"{name}: {exc}") from None
    except OSError as exc:
        raise _back_to_page(problem=f"{name}: cannot listen on its port again: {exc}") from None
    options = " ".join(f"{key}={value}" for key, value in spec.options().items())
    raise _back_to_page(notice=f"{name} is now {spec.mode.value} {options}".rstrip())


@CONTROL_ROUTES.post("/page/services/{name}/reset")
async def page_reset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await _fakes(request).server(name).reset()
    except UnknownServiceError as exc:
        raise _back_to_page(problem=str(exc)) from None
    except OSError as exc:
        raise _back_to_page(problem=f"{name}: cannot listen on its port again: {exc}") from None
    raise _back_to_page(notice=f"{name} reset: healthy, no records")


@CONTROL_ROUTES.get("/services")
async def list_services(request: web.Request) -> web.Response:
    return web.json_response(_fakes(request).describe())


@CONTROL_ROUTES.get("/services/{name}")
async def get_service(request: web.Request) -> web.Response:
    return web.json_response(_server(request).describe())


@CONTROL_ROUTES.get("/services/{name}/records")
async def get_records(request: web.Request) -> web.Response:
    return web.json_response(_server(request).service.records)


@CONTROL_ROUTES.put("/services/{name}/mode")
async def put_mode(request: web.Request) -> web.Response:
    server = _server(request)
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_mode", f"body is not valid JSON: {exc}") from None
    try:
        spec = parse_mode(body)
    except ModeError as exc:
        raise ApiError(400, "invalid_mode", str(exc), problems=exc.problems) from None
    await _reopening(server, server.set_mode(spec))
    return web.json_response(server.describe())


@CONTROL_ROUTES.post("/services/{name}/reset")
async def post_reset(request: web.Request) -> web.Response:
    server = _server(request)
    await _reopening(server, server.reset())
    return web.json_response(server.describe())
