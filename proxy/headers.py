"""Hop-by-hop stripping (RFC 9110 §7.6.1, incl. Connection-named) and X-Forwarded-*.

Pure: no asyncio, aiohttp, SQLite or Prometheus; works on any multimapping of str → str.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def upstream_request_headers(items: Iterable[tuple[str, str]], connection: list[str], *,
                             client_ip: str | None, proto: str, host: str | None,
                             ) -> list[tuple[str, str]]:
    """End-to-end request headers plus X-Forwarded-For/-Proto/-Host, as a list of pairs."""
    drop = _REQUEST_DROP | connection_named(connection) if connection else _REQUEST_DROP
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "x-forwarded-for":
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
