"""headers: hop-by-hop stripping (incl. Connection-named) and X-Forwarded-* (§2), for the
aiohttp path (str) and the fast server (bytes) alike."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.headers import (
    HOP_BY_HOP,
    downstream_response_fields,
    downstream_response_headers,
    upstream_request_head,
    upstream_request_headers,
)


def test_request_headers_drop_hop_by_hop_and_connection_named_and_set_forwarded():
    items = [("Host", "proxy:8080"), ("Connection", "keep-alive, X-Drop"), ("X-Drop", "1"),
             ("Keep-Alive", "300"), ("TE", "trailers"), ("X-Keep", "yes"),
             ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Host", "evil"), ("X-Forwarded-Proto", "ftp")]
    out = upstream_request_headers(items, ["keep-alive, X-Drop"], client_ip="127.0.0.1", proto="http",
                                   host="proxy:8080")
    assert out == [("X-Keep", "yes"), ("X-Forwarded-For", "203.0.113.7, 127.0.0.1"),
                   ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "proxy:8080")]


def test_response_headers_drop_hop_by_hop_and_connection_named():
    items = [("Connection", "close, X-Secret"), ("X-Secret", "1"), ("Transfer-Encoding", "chunked"),
             ("Content-Type", "text/plain"), ("Content-Length", "3")]
    assert downstream_response_headers(items, ["close, X-Secret"]) == [
        ("Content-Type", "text/plain"), ("Content-Length", "3")]


def fields(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes, bytes]]:
    return [(n.encode(), n.lower().encode(), v.encode()) for n, v in pairs]


def test_upstream_request_head_bytes():
    head = upstream_request_head(
        b"POST", b"/base/charges?x=1&y", fields([
            ("Host", "proxy"), ("Connection", "X-Drop"), ("X-Drop", "1"), ("Expect", "100-continue"),
            ("Content-Length", "3"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"),
            ("Proxy-Authorization", "secret"), ("Accept", "*/*")]),
        frozenset({b"x-drop"}), host=b"127.0.0.1:9101", client_ip=b"127.0.0.1", proto=b"http",
        forwarded_host=b"proxy", framing=b"")
    assert head == (b"POST /base/charges?x=1&y HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"
                    b"Content-Length: 3\r\nAccept: */*\r\n"
                    b"X-Forwarded-For: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n"
                    b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: proxy\r\n\r\n")


def test_upstream_request_head_adds_framing_and_skips_what_it_lacks():
    head = upstream_request_head(b"PUT", b"/", [], None, host=b"h", client_ip=None, proto=b"http",
                                 forwarded_host=None, framing=b"Transfer-Encoding: chunked\r\n")
    assert head == b"PUT / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: http\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_downstream_response_fields_bytes():
    parts = [b"HTTP/1.1 200 OK\r\n"]
    has_date = downstream_response_fields(parts, fields([
        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
        ("Content-Length", "10"), ("Date", "Tue, 01 Jan 2030 00:00:00 GMT"), ("X-End", "kept")]),
        frozenset({b"keep-alive", b"x-hop"}))
    assert (b"".join(parts), has_date) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\nX-End: kept\r\n", True)
    parts = []
    has_date = downstream_response_fields(parts, fields([("Content-Length", "10"), ("X-End", "kept")]),
                                          None, keep_length=False)
    assert (b"".join(parts), has_date) == (b"X-End: kept\r\n", False)


NAMES = st.sampled_from(["Connection", "Keep-Alive", "TE", "Upgrade", "Trailer", "Transfer-Encoding",
                         "Proxy-Authorization", "X-A", "X-B", "x-a", "Accept", "Content-Length"])


@given(st.lists(st.tuples(NAMES, st.sampled_from(["1", "x-b", "X-A, close", "keep-alive"])), max_size=8))
def test_no_hop_by_hop_or_connection_named_field_ever_goes_upstream(pairs):
    connection_values = [v for n, v in pairs if n.lower() == "connection"]
    named = {t.strip().lower().encode() for v in connection_values for t in v.split(",") if t.strip()}
    head = upstream_request_head(b"GET", b"/", fields(pairs), frozenset(named) or None, host=b"h",
                                 client_ip=b"1.2.3.4", proto=b"http", forwarded_host=b"p")
    sent = [line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:] if line]
    dropped = {n.encode() for n in HOP_BY_HOP} | named
    assert not dropped & set(sent) - {b"host"}
    # Everything else arrives, in order.
    kept = [n.lower().encode() for n, _ in pairs if n.lower().encode() not in dropped]
    assert [name for name in sent if name not in (b"host", b"x-forwarded-for", b"x-forwarded-proto",
                                                  b"x-forwarded-host")] == kept
