"""Request smuggling and framing through the real proxy (RFC 9112 §6, §7, §2.2, §5): every
ambiguous message is refused with its status and its connection closed, the upstream (a raw
recorder with its own strict parser) gets not a byte of it, and the next client is served.
Where the proxy accepts a message, it re-frames it itself, so the upstream sees only clean
framing: `Transfer-Encoding: chunked` it wrote, its own chunk sizes, no extensions, no trailers.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.test_wire import Conn
from tests.security import CONFIG, RawUpstream, refused, still_served

SMUGGLED = b"GET /up/smuggled HTTP/1.1\r\nHost: p\r\n\r\n"


@pytest.fixture
async def upstream():
    server = RawUpstream()
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(CONFIG, up=upstream.url)


def post(*headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /up/x " + version + b"\r\nHost: p\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED

# -- CL.TE, TE.CL, TE.TE, Content-Length forms: 400 before anything goes upstream -----------------

AMBIGUOUS = {
    "CL.TE": post(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
    "TE.CL": post(b"Transfer-Encoding: chunked", b"Content-Length: 4", body=b"5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
    "CL.TE obfuscated": post(b"Content-Length: 6", b"Transfer-Encoding: Chunked", body=CHUNKED_SMUGGLE),
    "TE xchunked": post(b"Transfer-Encoding: xchunked", body=CHUNKED_SMUGGLE),
    "TE chunked, identity": post(b"Transfer-Encoding: chunked, identity", body=CHUNKED_SMUGGLE),
    "TE identity": post(b"Transfer-Encoding: identity", body=CHUNKED_SMUGGLE),
    "TE gzip, chunked": post(b"Transfer-Encoding: gzip, chunked", body=CHUNKED_SMUGGLE),
    "TE chunked, chunked": post(b"Transfer-Encoding: chunked, chunked", body=CHUNKED_SMUGGLE),
    "TE twice": post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
    "TE twice, second other": post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity",
                                   body=CHUNKED_SMUGGLE),
    "TE space before colon": post(b"Transfer-Encoding : chunked", body=CHUNKED_SMUGGLE),
    "TE tab before colon": post(b"Transfer-Encoding\t: chunked", body=CHUNKED_SMUGGLE),
    # OWS, but llhttp's strict mode refuses a tab after `chunked`: refused, consistently.
    "TE trailing tab": post(b"Transfer-Encoding: chunked\t", body=CHUNKED_SMUGGLE),
    "TE vertical tab": post(b"Transfer-Encoding:\x0bchunked", body=CHUNKED_SMUGGLE),
    "TE form feed": post(b"Transfer-Encoding: chunked\x0c", body=CHUNKED_SMUGGLE),
    "TE folded": post(b"Transfer-Encoding:", b" chunked", body=CHUNKED_SMUGGLE),
    "TE folded with tab": post(b"Transfer-Encoding: x", b"\tchunked", body=CHUNKED_SMUGGLE),
    "TE hidden in a folded line": post(b"X-A: a", b" Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE),
    "TE in HTTP/1.0": post(b"Transfer-Encoding: chunked", body=CHUNKED_SMUGGLE, version=b"HTTP/1.0"),
    "TE quoted": post(b'Transfer-Encoding: "chunked"', body=CHUNKED_SMUGGLE),
    "CL twice, same value": post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
    "CL twice, different values": post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"),
    "CL list": post(b"Content-Length: 5, 5", body=b"hello"),
    "CL +5": post(b"Content-Length: +5", body=b"hello"),
    "CL -5": post(b"Content-Length: -5", body=b"hello"),
    "CL 0x5": post(b"Content-Length: 0x5", body=b"hello"),
    "CL 5e0": post(b"Content-Length: 5e0", body=b"hello"),
    "CL space inside": post(b"Content-Length: 1 0", body=b"helloworld"),
    "CL empty": post(b"Content-Length: ", body=b"hello"),
    "CL huge": post(b"Content-Length: 99999999999999999999999", body=b"hello"),
    "CL space before colon": post(b"Content-Length : 5", body=b"hello"),
    "CL folded": post(b"Content-Length:", b" 5", body=b"hello"),
    "CL fullwidth digit": post("Content-Length: ５".encode(), body=b"hello"),
}


@pytest.mark.parametrize("request_bytes", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
async def test_ambiguous_framing_is_400_and_never_reaches_the_upstream(proxy, upstream, request_bytes):
    _, _, body = await refused(proxy, upstream, request_bytes, 400)
    assert body.startswith(b'{"error": "bad_request"')
    assert b"smuggled" not in upstream.data


async def test_a_transfer_coding_other_than_chunked_is_refused_not_guessed(proxy, upstream):
    """RFC 9112 §6.1 lets a server answer 501 to an unknown coding; this one says 400 for any
    Transfer-Encoding it will not pass on (a request it cannot frame)."""
    await refused(proxy, upstream, post(b"Transfer-Encoding: compress", body=b"x"), 400)


# -- accepted, because they mean exactly `chunked`, and re-framed by the proxy -------------------

SAME_AS_CHUNKED = {
    "trailing space (OWS)": b"Transfer-Encoding: chunked ",
    "tab after the colon (OWS)": b"Transfer-Encoding:\tchunked",
    "no space after the colon": b"Transfer-Encoding:chunked",
    "capitalised (case-insensitive coding)": b"Transfer-Encoding: Chunked",
    "upper-case name": b"TRANSFER-ENCODING: CHUNKED",
}


@pytest.mark.parametrize("te", SAME_AS_CHUNKED.values(), ids=SAME_AS_CHUNKED.keys())
async def test_transfer_encoding_that_means_chunked_is_reframed_by_the_proxy(proxy, upstream, te):
    conn = await Conn.open(proxy)
    conn.send(post(te, body=b"5\r\nhello\r\n0\r\n\r\n") + b"GET /up/next HTTP/1.1\r\nHost: p\r\n\r\n")
    assert (await conn.response())[:3:2] == (200, b"upstream ok")
    assert (await conn.response())[0] == 200
    conn.close()
    first, second = upstream.requests
    assert first.header("transfer-encoding") == [b"chunked"]  # the proxy's own line
    assert first.names.count(b"transfer-encoding") == 1 and b"content-length" not in first.names
    assert (first.body, second.target) == (b"hello", b"/next")
    assert b"Transfer-Encoding: chunked\r\n" in upstream.data and te not in upstream.data.replace(
        b"Transfer-Encoding: chunked\r\n", b"")
    assert upstream.errors == []


# -- line ends, NUL and control bytes ------------------------------------------------------------

LINES = {
    "bare LF after the request line": b"GET /up/x HTTP/1.1\nHost: p\r\n\r\n",
    "bare CR after the request line": b"GET /up/x HTTP/1.1\rHost: p\r\n\r\n",
    "bare LF between headers": b"GET /up/x HTTP/1.1\r\nHost: p\nX-A: b\r\n\r\n",
    "bare CR between headers": b"GET /up/x HTTP/1.1\r\nHost: p\rX-A: b\r\n\r\n",
    "bare LF ending the head": b"GET /up/x HTTP/1.1\r\nHost: p\r\n\n",
    "bare CR ending the head": b"GET /up/x HTTP/1.1\r\nHost: p\r\n\rX",
    "LF-only message": b"GET /up/x HTTP/1.1\nHost: p\n\n",
    "CR inside a value": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A: a\rX-Injected: yes\r\n\r\n",
    "LF inside a value": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A: a\nX-Injected: yes\r\n\r\n",
    "NUL in the method": b"G\x00ET /up/x HTTP/1.1\r\nHost: p\r\n\r\n",
    "control byte in the method": b"GE\x01T /up/x HTTP/1.1\r\nHost: p\r\n\r\n",
    "NUL in the target": b"GET /up/a\x00b HTTP/1.1\r\nHost: p\r\n\r\n",
    "control byte in the target": b"GET /up/a\x01b HTTP/1.1\r\nHost: p\r\n\r\n",
    "DEL in the target": b"GET /up/a\x7fb HTTP/1.1\r\nHost: p\r\n\r\n",
    "tab in the target": b"GET /up/a\tb HTTP/1.1\r\nHost: p\r\n\r\n",
    "NUL in a header name": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-\x00A: b\r\n\r\n",
    "control byte in a header name": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-\x01A: b\r\n\r\n",
    "space in a header name": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX A: b\r\n\r\n",
    "empty header name": b"GET /up/x HTTP/1.1\r\nHost: p\r\n: b\r\n\r\n",
    "header without a colon": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A b\r\n\r\n",
    "NUL in a header value": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A: a\x00b\r\n\r\n",
    "control byte in a header value": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A: a\x01b\r\n\r\n",
    "escape byte in a header value": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A: a\x1b[31mb\r\n\r\n",
    "DEL in a header value": b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-A: a\x7fb\r\n\r\n",
    "NUL in the version": b"GET /up/x HTTP/1.\x001\r\nHost: p\r\n\r\n",
    "whitespace before the first header": b"GET /up/x HTTP/1.1\r\n Host: p\r\n\r\n",
    "lower-case version": b"GET /up/x http/1.1\r\nHost: p\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", LINES.values(), ids=LINES.keys())
async def test_bare_cr_lf_nul_and_control_bytes_are_400(proxy, upstream, request_bytes):
    await refused(proxy, upstream, request_bytes, 400)


async def test_unsupported_http_versions_are_505(proxy, upstream):
    for version in (b"HTTP/2.0", b"HTTP/3.0"):
        await refused(proxy, upstream, b"GET /up/x " + version + b"\r\nHost: p\r\n\r\n", 505)
    for version in (b"HTTP/1.2", b"HTTP/1.10", b"HTTP/9.9", b"HTTP/0.9"):
        await refused(proxy, upstream, b"GET /up/x " + version + b"\r\nHost: p\r\n\r\n", (400, 505))


async def test_a_request_without_host_and_a_second_host_are_refused(proxy, upstream):
    await refused(proxy, upstream, b"GET /up/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
    await refused(proxy, upstream, b"GET /up/x HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400)


# -- chunked bodies: sizes, extensions, trailers, mismatches -------------------------------------

def chunked_head(path: bytes = b"/up/x") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"


async def broken_body(proxy, upstream, pieces: list[bytes], statuses: tuple[int, ...]) -> None:
    """A body whose framing breaks after the head: the status and a closed connection; the
    upstream may have been sent the head (and re-framed data) but never completes a request
    nor sees a byte it cannot parse, since its connection is cut off."""
    conn = await Conn.open(proxy)
    for piece in pieces:
        conn.send(piece)
        await asyncio.sleep(0.02)
    status, headers, _ = await conn.response()
    assert status in statuses and headers["connection"] == "close"
    assert await conn.closed()
    conn.close()
    await asyncio.sleep(0.05)
    assert upstream.requests == [] and upstream.errors == []
    assert b"smuggled" not in upstream.data
    await still_served(proxy, upstream)


CHUNKS = {
    "17 hex digits": b"10000000000000000\r\nhello\r\n0\r\n\r\n",
    "18 f": b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "size 0x5": b"0x5\r\nhello\r\n0\r\n\r\n",
    "size -5": b"-5\r\nhello\r\n0\r\n\r\n",
    "size +5": b"+5\r\nhello\r\n0\r\n\r\n",
    "size with a space inside": b"5 5\r\nhello\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "bare LF after the size": b"5\nhello\r\n0\r\n\r\n",
    "bare LF after the data": b"5\r\nhello\n0\r\n\r\n",
    "data longer than its size": b"5\r\nhello world\r\n0\r\n\r\n" + SMUGGLED,
    "no CRLF after the data": b"5\r\nhelloX\r\n0\r\n\r\n",
    "quoted extension with a CR": b'5;a="b\rc"\r\nhello\r\n0\r\n\r\n',
    "quoted extension with a LF": b'5;a="b\nc"\r\nhello\r\n0\r\n\r\n',
    "extension with a NUL": b"5;a=b\x00c\r\nhello\r\n0\r\n\r\n",
    "unterminated quoted extension": b'5;a="bc\r\nhello\r\n0\r\n\r\n',
    "last chunk with a bare LF": b"5\r\nhello\r\n0\n\r\n",
    "trailer with a bare LF": b"5\r\nhello\r\n0\r\nX-T: a\n\r\n",
    "folded trailer": b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    "trailer with a NUL": b"5\r\nhello\r\n0\r\nX-T: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("body", CHUNKS.values(), ids=CHUNKS.keys())
async def test_malformed_chunked_bodies_are_400_and_never_complete_upstream(proxy, upstream, body):
    await broken_body(proxy, upstream, [chunked_head() + body], (400,))
    await broken_body(proxy, upstream, [chunked_head(), body], (400,))  # the head went up first


async def test_a_chunk_larger_than_max_body_bytes_is_413(proxy, upstream):
    await broken_body(proxy, upstream, [chunked_head(), b"ffffffff\r\n", b"z" * 60_000, b"z" * 60_000], (413,))


async def test_a_very_long_chunk_extension_is_refused(proxy, upstream):
    """RFC 9112 §7.1.1: a recipient should limit chunk-ext length. llhttp skips extensions
    without a limit, so the proxy counts the bytes that bring no progress."""
    extension = b"5;" + b"a" * 200_000
    await broken_body(proxy, upstream, [chunked_head(), extension[:50_000], extension[50_000:]], (400, 431))


async def test_many_extensions_on_tiny_chunks_are_fine(proxy, upstream):
    conn = await Conn.open(proxy)
    body = b"".join(b"1;name=value;q=\"quoted\"\r\n%c\r\n" % c for c in b"hello") + b"0\r\n\r\n"
    conn.send(chunked_head() + body)
    assert (await conn.response())[0] == 200
    conn.close()
    (request,) = upstream.requests
    assert request.body == b"hello"
    assert b"name=value" not in upstream.data and b"quoted" not in upstream.data  # not forwarded


async def test_framing_fields_in_trailers_are_400(proxy, upstream):
    """llhttp's strict mode refuses Content-Length and Transfer-Encoding in a trailer section."""
    for trailer in (b"Content-Length: 5", b"Transfer-Encoding: chunked"):
        await broken_body(proxy, upstream, [chunked_head(), b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n\r\n"
                                            + SMUGGLED], (400,))


async def test_what_the_proxy_rewrites_anyway_is_accepted(proxy, upstream):
    """Two spaces in the request line (RFC 9112 §3 lets a recipient parse on whitespace) and a
    chunk size with leading zeros past 64 bits (still 5) are unambiguous; the upstream gets the
    proxy's own request line and chunk sizes."""
    conn = await Conn.open(proxy)
    conn.send(b"GET  /up/a HTTP/1.1\r\nHost: p\r\n\r\n")
    assert (await conn.response())[0] == 200
    conn.send(chunked_head(b"/up/b") + b"0000000000000000000000000000000000005\r\nhello\r\n0\r\n\r\n")
    assert (await conn.response())[0] == 200
    conn.close()
    first, second = upstream.requests
    assert upstream.data.startswith(b"GET /a HTTP/1.1\r\n")
    assert (second.target, second.body) == (b"/b", b"hello")
    assert b"00000005" not in upstream.data


async def test_a_huge_trailer_section_is_431(proxy, upstream):
    trailers = b"".join(b"X-T-%d: %s\r\n" % (i, b"v" * 100) for i in range(500))
    await broken_body(proxy, upstream, [chunked_head(), b"5\r\nhello\r\n0\r\n", trailers, b"\r\n"], (431,))


async def test_trailer_fields_are_never_forwarded(proxy, upstream):
    """Forbidden trailer fields (framing, routing, auth) must not become headers upstream; the
    proxy sends no trailers at all."""
    conn = await Conn.open(proxy)
    conn.send(chunked_head() + b"5\r\nhello\r\n0\r\n"
              b"Host: evil\r\nAuthorization: Bearer x\r\nX-Trailer: t\r\n\r\n" + SMUGGLED)
    assert (await conn.response())[0] == 200
    assert (await conn.response())[0] == 200  # the pipelined request after it, as its own
    conn.close()
    first, second = upstream.requests
    assert first.body == b"hello" and first.trailers == []
    assert first.header("transfer-encoding") == [b"chunked"] and first.header("content-length") == []
    assert b"x-trailer" not in first.names and b"authorization" not in first.names
    assert first.header("host") == [f"127.0.0.1:{upstream.port}".encode()]
    assert second.target == b"/smuggled"
    assert b"evil" not in upstream.data and b"X-Trailer" not in upstream.data


async def test_a_chunk_shorter_than_announced_waits_then_408(start_proxy, upstream):
    """Data shorter than its size is not a framing error yet: the chunk is still open. The
    proxy waits for the rest only body_timeout_ms; the upstream never sees a complete request."""
    proxy = await start_proxy(CONFIG.replace("max_header_bytes: 8192", "max_header_bytes: 8192, body_timeout_ms: 200"),
                              up=upstream.url)
    await broken_body(proxy, upstream, [chunked_head() + b"a\r\nhello\r\n0\r\n\r\n"], (408,))
