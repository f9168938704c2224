"""An HTTPS upstream for tests: a throwaway CA (trustme) and a small aiohttp server on loopback.

Holds test-only keys and certificates, made fresh per use and written only where a test asks
(its tmp_path). Never imported by the proxy; never listens beyond 127.0.0.1.

    ca = trustme.CA()
    async with TlsUpstream(ca) as upstream:                  # https://127.0.0.1:<port>
        ca_file = write_ca(ca, tmp_path / "shop-ca.pem")
        ...                                                  # GET /stock/SKU-001 → 200
        assert [(r.method, r.path) for r in upstream.requests] == [("GET", "/stock/SKU-001")]
        assert upstream.connections == 1                     # TLS connections that carried them

`POST /charges` with a JSON body answers 201 with a charge (for queue replay over TLS).

Mutual TLS: `TlsUpstream(ca, require_client_cert=True)` refuses clients without a certificate
signed by `client_ca` (default: `ca`); `write_client_cert(ca, folder)` makes one for the proxy.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import trustme
from aiohttp import web

STOCK = {"SKU-001": {"sku": "SKU-001", "available": 5}}


@dataclass(frozen=True)
class Received:
    """One request as the upstream saw it."""

    method: str
    path: str  # path and query, as sent
    headers: dict[str, str]
    body: bytes
    client_names: tuple[str, ...]  # the client certificate's subjectAltName values; () without one
    connection: int = 0  # which TLS connection carried it: 1, 2, … in the order they were first used


def write_ca(ca: trustme.CA, path: Path) -> Path:
    """The CA's certificate as PEM at `path` (what a config's `tls.ca_file` names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path))
    return path


def write_client_cert(ca: trustme.CA, folder: Path, name: str = "circuit-proxy.test") -> tuple[Path, Path]:
    """A client certificate for `name` signed by `ca`: (chain PEM, key PEM) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(name)
    cert, key = folder / f"{name}.crt.pem", folder / f"{name}.key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


class TlsUpstream:
    """An aiohttp HTTPS server on 127.0.0.1:<free port> answering `GET /stock/<sku>` and
    `POST /charges`.

    The server certificate is issued by `ca` for `names` (default "localhost" and
    "127.0.0.1"); pass other names to test a host name mismatch. Every request, answered or
    not, is appended to `requests`.
    """

    def __init__(self, ca: trustme.CA | None = None, *, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
                 require_client_cert: bool = False, client_ca: trustme.CA | None = None) -> None:
        self.ca = ca or trustme.CA()
        self.names = names
        self.require_client_cert = require_client_cert
        self.client_ca = client_ca or self.ca
        self.requests: list[Received] = []
        # Transport → its number; the transports are kept so that no id is reused meanwhile.
        self._connections: dict[int, tuple[object, int]] = {}
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL for a config's `upstream`."""
        return f"https://{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """How many TLS connections carried at least one request."""
        return len(self._connections)

    def write_ca(self, path: Path) -> Path:
        return write_ca(self.ca, path)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*self.names).configure_cert(context)
        if self.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(context)
        return context

    async def start(self) -> TlsUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.server_context())
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TlsUpstream:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        names = tuple(value for _, value in (peer or {}).get("subjectAltName", ()))
        transport = request.transport
        key = id(transport)
        if key not in self._connections:
            self._connections[key] = (transport, len(self._connections) + 1)
        body = await request.read()
        self.requests.append(Received(request.method, request.path_qs, dict(request.headers), body,
                                      names, self._connections[key][1]))
        sku = request.path.removeprefix("/stock/")
        if request.method == "GET" and request.path.startswith("/stock/") and sku in STOCK:
            return web.Response(text=json.dumps(STOCK[sku]), content_type="application/json")
        if request.method == "POST" and request.path == "/charges":
            charge = {"id": f"ch-{len(self.requests)}", "status": "succeeded",
                      "idempotency_key": request.headers.get("Idempotency-Key"), **json.loads(body or b"{}")}
            return web.Response(status=201, text=json.dumps(charge), content_type="application/json")
        return web.Response(status=404, text=json.dumps({"error": "not found"}),
                            content_type="application/json")
