"""Size and time limits through the real proxy: an oversized request line (431), header section
(431), header line that never ends (431 while it is still coming, not buffered to the end),
body (413, by Content-Length or chunked past the limit), stalled heads and bodies (slowloris:
408 after header_timeout_ms / body_timeout_ms) and more connections than max_connections
(closed at once). Each time the upstream never completes a request and others are served.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.test_wire import Conn
from tests.security import CONFIG, RawUpstream, get, refused, still_served

LIMITS = CONFIG.replace("max_header_bytes: 8192", "max_header_bytes: 8192, header_timeout_ms: 200, "
                                                  "body_timeout_ms: 200, max_connections: 50")


@pytest.fixture
async def upstream():
    server = RawUpstream()
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(LIMITS, up=upstream.url)


async def test_an_oversized_request_line_is_431(proxy, upstream):
    # The request line may be max(8190, 4 × max_header_bytes) = 32768 bytes long.
    await refused(proxy, upstream, get("/up/" + "a" * 40_000), (414, 431))
    conn = await Conn.open(proxy)
    conn.send(get("/up/" + "a" * 20_000))  # long, but within the allowance: forwarded as it is
    assert (await conn.response())[0] == 200
    conn.close()
    assert upstream.requests[0].target == b"/" + b"a" * 20_000


async def test_an_oversized_request_line_sent_in_pieces_is_431(proxy, upstream):
    await refused(proxy, upstream, [b"GET /up/"] + [b"a" * 4096] * 10 + [b" HTTP/1.1\r\n\r\n"], (414, 431))


async def test_an_oversized_header_section_is_431(proxy, upstream):
    many = "".join(f"X-H-{i}: {'v' * 90}\r\n" for i in range(100))  # each small, ~10 KB together
    _, _, body = await refused(proxy, upstream, get("/up/x", many), 431)
    assert body == b'{"error": "request_header_fields_too_large", "max_header_bytes": 8192}'
    await refused(proxy, upstream, get("/up/x", f"X-Big: {'b' * 9000}\r\n"), 431)


async def test_a_header_line_that_never_ends_is_431_while_it_is_still_coming(proxy, upstream):
    """httptools holds a header line until it ends: the proxy stops it past the limit instead
    of buffering whatever the client sends until the header timeout."""
    conn = await Conn.open(proxy)
    conn.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Endless: ")
    for _ in range(4):
        conn.send(b"e" * 8192)
        await asyncio.sleep(0.01)
    status, headers, _ = await conn.response()  # within header_timeout_ms would be 408
    assert (status, headers["connection"]) == (431, "close")
    conn.writer.transport.abort()
    assert upstream.data == b""
    await still_served(proxy, upstream)


async def test_a_body_over_max_body_bytes_is_413(proxy, upstream):
    _, _, body = await refused(proxy, upstream, b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 100001\r\n\r\n",
                               413)
    assert body == b'{"error": "payload_too_large", "max_body_bytes": 100000}'


async def test_a_chunked_body_going_over_max_body_bytes_is_413_and_never_completes_upstream(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(30):
        conn.send(b"1000\r\n" + b"z" * 4096 + b"\r\n")
        await conn.writer.drain()
    conn.send(b"0\r\n\r\n")
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == (413, "close")
    assert await conn.closed()
    await asyncio.sleep(0.05)
    assert upstream.requests == [] and upstream.errors == []  # cut off, never complete
    upstream.clear()
    await still_served(proxy, upstream)


# -- slowloris ---------------------------------------------------------------------------------------

async def test_a_stalled_head_is_408_and_closed(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\n")
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == (408, "close")
    assert await conn.closed()
    assert upstream.data == b""
    await still_served(proxy, upstream)


async def test_a_head_trickled_a_byte_at_a_time_is_408(proxy, upstream):
    """header_timeout_ms bounds the whole head, not the pause between its bytes."""
    conn = await Conn.open(proxy)
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = asyncio.ensure_future(conn.response())
    for byte in b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Slow: " + b"s" * 200:
        if answer.done():
            break
        conn.send(bytes([byte]))
        await asyncio.sleep(0.02)
    status, _, _ = await answer
    assert status == 408 and loop.time() - started < 2.0
    conn.close()
    assert upstream.data == b""
    await still_served(proxy, upstream)


async def test_a_stalled_body_is_408_and_the_upstream_never_gets_a_whole_request(proxy, upstream):
    for request in (b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nabc",
                    b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"):
        conn = await Conn.open(proxy)
        conn.send(request)
        status, headers, _ = await conn.response()
        assert (status, headers["connection"]) == (408, "close")
        assert await conn.closed()
        conn.close()
        await asyncio.sleep(0.05)
        assert upstream.requests == [] and upstream.errors == []
        upstream.clear()
        await still_served(proxy, upstream)


async def test_an_idle_connection_between_requests_is_not_408(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(get("/up/a"))
    assert (await conn.response())[0] == 200
    await asyncio.sleep(0.5)  # idle (idle_timeout_ms is 75 s), not a stalled request
    conn.send(get("/up/b"))
    assert (await conn.response())[0] == 200
    conn.close()


# -- too many connections ----------------------------------------------------------------------------

async def test_connections_past_max_connections_are_closed_at_once(proxy, upstream):
    conns = [await Conn.open(proxy) for _ in range(60)]
    try:
        async def refused_at_once(conn: Conn) -> bool:
            try:
                return await asyncio.wait_for(conn.reader.read(), 0.5) == b""
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        closed = await asyncio.gather(*(refused_at_once(conn) for conn in conns))
        assert closed == [False] * 50 + [True] * 10
        assert proxy.server.refused_connections == 10
        for conn in (conns[0], conns[49]):  # the first 50 are still served
            conn.send(get("/up/kept"))
            assert (await conn.response())[0] == 200
    finally:
        for conn in conns:
            conn.close()
    for _ in range(100):
        if not proxy.server.connections:
            break
        await asyncio.sleep(0.01)
    assert not proxy.server.connections
    upstream.clear()
    await still_served(proxy, upstream)
