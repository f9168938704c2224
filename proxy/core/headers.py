"""Hop-by-hop stripping (RFC 9110 §7.6.1, incl. Connection-named) and X-Forwarded-*.

Pure: no asyncio, aiohttp, SQLite or Prometheus; works on any multimapping of str → str.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade",
    "trailer", "proxy-authenticate", "proxy-authorization",
})
# Set by the proxy itself for the upstream hop.
_REQUEST_DROP = HOP_BY_HOP | {"host", "x-forwarded-proto", "x-forwarded-host"}


def connection_named(values: Iterable[str]) -> set[str]:
    """Header names listed in Connection header values (lower-case)."""
    named: set[str] = set()
    for value in values:
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                named.add(token)
    return named


@lru_cache(maxsize=16)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def client_is_trusted(client_ip: str | bytes | None, proxies: tuple[str, ...]) -> bool:
    """Whether a direct client at `client_ip` is in one of the `proxies` networks (CIDR), so
    that its X-Forwarded-* headers may be believed. Meant to be asked once per connection."""
    if not proxies or not client_ip:
        return False
    try:
        address = ipaddress.ip_address(client_ip.decode() if isinstance(client_ip, bytes) else client_ip)
    except ValueError:
        return False  # not an IP (e.g. a Unix socket): never trusted
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return any(address in network for network in _networks(proxies))


def upstream_request_headers(items: Iterable[tuple[str, str]], connection: list[str], *,
                             client_ip: str | None, proto: str, host: str | None,
                             trust_forwarded: bool = True) -> list[tuple[str, str]]:
    """End-to-end request headers plus X-Forwarded-For/-Proto/-Host, as a list of pairs.
    Without `trust_forwarded`, an incoming X-Forwarded-For is dropped, not appended to."""
    drop = _REQUEST_DROP | connection_named(connection) if connection else _REQUEST_DROP
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "x-forwarded-for":
            if trust_forwarded:
                forwarded_for.append(value)
            continue
        out.append((name, value))
    if client_ip:
        forwarded_for.append(client_ip)
    if forwarded_for:
        out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", proto))
    if host:
        out.append(("X-Forwarded-Host", host))
    return out


def downstream_response_headers(items: Iterable[tuple[str, str]], connection: list[str]
                                ) -> list[tuple[str, str]]:
    """The upstream response's end-to-end headers (framing is the proxy's own business)."""
    drop = HOP_BY_HOP | connection_named(connection) if connection else HOP_BY_HOP
    return [(name, value) for name, value in items if name.lower() not in drop]


# -- the fast server's byte-level versions: one pass, no str decoding, no per-call set building --

HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
# Also dropped on the way up: framing the proxy redoes (Expect is answered here, §4) and the
# X-Forwarded-* it sets itself.
_REQUEST_DROP_BYTES = frozenset(name.encode() for name in _REQUEST_DROP) | {b"expect"}
_XFF = b"x-forwarded-for"

Field = tuple[bytes, bytes, bytes]  # (name as sent, lower-case name, value)


def upstream_request_head(method: bytes, target: bytes, fields: Iterable[Field],
                          connection_tokens: frozenset[bytes] | None, *, host: bytes,
                          client_ip: bytes | None, proto: bytes, forwarded_host: bytes | None,
                          framing: bytes = b"", trust_forwarded: bool = True) -> bytes:
    """The request head for the upstream hop: end-to-end fields as sent (hop-by-hop ones and
    those named in Connection dropped), `Host` of the upstream, X-Forwarded-For/-Proto/-Host,
    then `framing` (e.g. `Transfer-Encoding: chunked\\r\\n`). X-Forwarded-Proto and -Host are
    always the proxy's own; an incoming X-Forwarded-For is appended to only with
    `trust_forwarded` (the client is a trusted proxy), else dropped."""
    drop = _REQUEST_DROP_BYTES | connection_tokens if connection_tokens else _REQUEST_DROP_BYTES
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    forwarded_for: list[bytes] | None = None
    for name, lname, value in fields:
        if lname in drop:
            continue
        if lname == _XFF:
            if not trust_forwarded:
                continue
            if forwarded_for is None:
                forwarded_for = []
            forwarded_for.append(value)
            continue
        parts += (name, b": ", value, b"\r\n")
    if client_ip:
        if forwarded_for is None:
            forwarded_for = []
        forwarded_for.append(client_ip)
    if forwarded_for:
        parts += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
    parts += (b"X-Forwarded-Proto: ", proto, b"\r\n")
    if forwarded_host:
        parts += (b"X-Forwarded-Host: ", forwarded_host, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


def downstream_response_fields(parts: list[bytes], fields: Iterable[Field],
                               connection_tokens: frozenset[bytes] | None, *,
                               keep_length: bool = True) -> bool:
    """The upstream response's end-to-end fields appended to `parts` as pieces of
    `name: value\\r\\n` lines (joined once with the rest of the head); whether a Date was
    among them. Framing is the proxy's own business: without `keep_length` the body is
    re-framed, so a Content-Length beside chunked coding is dropped."""
    drop = HOP_BY_HOP_BYTES | connection_tokens if connection_tokens else HOP_BY_HOP_BYTES
    if not keep_length:
        drop = drop | {b"content-length"}
    has_date = False
    for name, lname, value in fields:
        if lname in drop:
            continue
        if lname == b"date":
            has_date = True
        parts += (name, b": ", value, b"\r\n")
    return has_date
