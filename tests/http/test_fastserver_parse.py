"""fastserver_parse: strict request and response heads, and the chunked decoder (§4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.fastserver_parse import ChunkedDecoder, HttpError, parse_request_head, parse_response_head


def test_a_request_head_with_every_framing_field():
    head = parse_request_head(b"POST /pay/charges?x=1 HTTP/1.1\r\nHost: proxy\r\nContent-Length: 12\r\n"
                              b"Connection: keep-alive, X-Hop\r\nExpect: 100-continue\r\nX-A:  v  ", 16384)
    assert (head.method, head.target, head.http11, head.content_length, head.chunked, head.keep_alive,
            head.host, head.expect_continue, head.connection_tokens) == (
        b"POST", b"/pay/charges?x=1", True, 12, False, True, b"proxy", True,
        frozenset({b"keep-alive", b"x-hop"}))
    assert head.fields[-1] == (b"X-A", b"x-a", b"v")


def test_connection_close_and_http_1_0_end_the_connection():
    assert not parse_request_head(b"GET / HTTP/1.1\r\nConnection: Close", 100).keep_alive
    assert not parse_request_head(b"GET / HTTP/1.0\r\nConnection: keep-alive", 100).keep_alive
    assert parse_request_head(b"GET / HTTP/1.1", 100).keep_alive


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1 2", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: identity", 400),
    (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked", 400),
    (b"GET / HTTP/1.1\r\nX: a\rb", 400),
    (b"GET / HTTP/1.1\r\nX: a\nb", 400),
    (b"GET / HTTP/1.1\r\n X: folded", 400),
    (b"GET / HTTP/1.1\r\nX : a", 400),
    (b"GET / HTTP/1.1\r\nBad Name: a", 400),
    (b"GET  / HTTP/1.1", 400),
    (b"GET / HTTP/1.1 ", 400),
    (b"GET /\x7f HTTP/1.1", 400),
    (b"GET / HTTP/3.0", 505),
    (b"GET / HTTP/1.1\r\nExpect: 200-ok", 417),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 200, 431),
])
def test_ambiguous_or_malformed_heads_are_refused(head, status):
    with pytest.raises(HttpError) as caught:
        parse_request_head(head, 100)
    assert caught.value.status == status


def test_response_heads():
    head = parse_response_head(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nContent-Length: 5\r\nX: y")
    assert (head.status, head.reason, head.content_length, head.chunked, head.keep_alive) == (
        201, b"Created", 5, False, True)
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9")
    assert (head.chunked, head.content_length) == (True, None)  # chunked wins (RFC 9112 §6.3)
    assert not parse_response_head(b"HTTP/1.0 200 OK").keep_alive
    assert parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive").keep_alive
    assert parse_response_head(b"HTTP/1.1 204").reason == b""
    for bad in (b"HTTP/1.1 2000 OK", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", b"ICY 200 OK"):
        with pytest.raises(HttpError):
            parse_response_head(bad)


def encode(body: bytes, sizes: list[int], trailer: bytes = b"") -> bytes:
    out, at = b"", 0
    for size in sizes:
        piece = body[at:at + size]
        if not piece:
            break
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) if size % 2 else b"%X\r\n%s\r\n" % (len(piece), piece)
        at += len(piece)
    if at < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - at, body[at:])
    return out + b"0\r\n" + trailer + b"\r\n"


@given(body=st.binary(max_size=300), sizes=st.lists(st.integers(1, 40), max_size=20),
       splits=st.lists(st.integers(1, 50), max_size=30), trailer=st.sampled_from([b"", b"X-T: 1\r\n"]),
       after=st.binary(max_size=10))
def test_chunked_decoding_is_independent_of_how_the_bytes_arrive(body, sizes, splits, trailer, after):
    wire = encode(body, sizes, trailer) + after
    decoder = ChunkedDecoder()
    decoded = b""
    at = 0
    for size in splits + [len(wire)]:
        if decoder.done or at >= len(wire):
            break
        decoded += b"".join(decoder.feed(wire[at:at + size]))
        at += size
    assert decoder.done
    assert decoded == body
    assert decoder.rest + wire[at:] == after


@pytest.mark.parametrize("wire", [b"g\r\n", b"5\r\nhelloXX", b"0x5\r\nhello\r\n", b" 5\r\n", b"5\nhello\r\n"])
def test_malformed_chunks_are_refused(wire):
    with pytest.raises(HttpError) as caught:
        ChunkedDecoder().feed(wire)
    assert caught.value.status == 400


def test_chunked_bodies_over_the_limit_are_413():
    decoder = ChunkedDecoder(limit=10)
    decoder.feed(b"5\r\nhello\r\n")
    with pytest.raises(HttpError) as caught:
        decoder.feed(b"6\r\n")
    assert caught.value.status == 413
