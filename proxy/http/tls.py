"""Client-side TLS for https upstreams: one `ssl.SSLContext` per service from its `tls` keys (§1a).

Holds the only use of `ssl` in the project's own settings path: `config/` checks that the
files exist, this module reads them. It never opens a connection, never reads the config
file, and never turns verification off unless the service says `verify: false`.

The pool builds one context per service, once (at start and on a reload that changes the
service), and passes it to every `create_connection` of that service: contexts are
thread-safe, and loading a CA bundle per connection would cost milliseconds each.

TLS session resumption is not done: Python resumes a session only when it is passed as
`session=` to `wrap_socket`/`wrap_bio`, and neither `loop.create_connection` nor
`loop.start_tls` (asyncio or uvloop) accepts one. Pooled keep-alive connections are what
saves handshakes here.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable

from proxy.config.model import Service, TlsSettings

log = logging.getLogger(__name__)


class TlsError(Exception):
    """A tls file the proxy cannot use; the message names the key path and the file."""


def client_context(tls: TlsSettings | None, name: str = "") -> ssl.SSLContext:
    """The context for a service's upstream connections; `name` is the service (for messages).

    No `tls` (or no `ca_file`): the system's CA store. With `ca_file`: only that bundle is
    trusted, as a shop's private CA should be. Certificate and host name are checked unless
    `verify: false`. Raises TlsError when a file cannot be loaded.
    """
    tls = tls or TlsSettings()
    where = f"services.{name}.tls" if name else "tls"
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{where}.ca_file: cannot load {tls.ca_file}: {_reason(exc)}") from None
    # TLS 1.0 and 1.1 are deprecated (RFC 8996); the default is already 1.2, say it anyway
    # so a different OpenSSL policy cannot lower it.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        # check_hostname must go off before verify_mode can be CERT_NONE.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("%s.verify is false: the upstream's certificate and host name are not "
                    "checked (service=%s)", where, name or "?")
    if tls.client_cert is not None:
        try:
            context.load_cert_chain(tls.client_cert, tls.client_key, password=_no_password)
        except _EncryptedKey:
            raise TlsError(f"{where}.client_key: {tls.client_key or tls.client_cert} is encrypted; "
                           "use an unencrypted key file readable only by the proxy") from None
        except (ssl.SSLError, OSError) as exc:
            files = ", ".join(str(f) for f in (tls.client_cert, tls.client_key) if f)
            raise TlsError(f"{where}.client_cert: cannot load {files}: {_reason(exc)}") from None
    return context


def client_contexts(services: Iterable[Service]) -> dict[str, ssl.SSLContext]:
    """One context per service with an https upstream, by service name."""
    return {service.name: client_context(service.tls, service.name) for service in services
            if service.upstream.lower().startswith("https://")}


def server_hostname(host: str) -> str:
    """What to pass as `server_hostname=` for an upstream host (the URL's host, no brackets).

    Always the host itself, IP literals included: asyncio checks the certificate against
    `server_hostname`, so None would turn the host check off. `ssl` sends SNI only for
    names and matches IP literals against the certificate's IP SANs.
    """
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and block the proxy's start.
    raise _EncryptedKey


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)



def connect_error(exc: OSError) -> str:
    """What a client's 502 says about a connection that could not be made: the reason, not
    where in OpenSSL's or CPython's sources it was found."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    return str(exc) or type(exc).__name__
