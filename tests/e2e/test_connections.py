"""Connections (§1a): a stalled head or body gets 408 and the connection closes, an idle
keep-alive connection is closed, and one connection over max_connections is closed at once.

Short configured timeouts; each test waits (bounded) for the close or answer it expects.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_one_path import EofReader
from tests.e2e.test_wire import Conn, Upstream

CONFIG = """
    storage: {path: $db}
    server: {header_timeout_ms: 200, body_timeout_ms: 200, idle_timeout_ms: 300, max_connections: 3}
    defaults: {failure_threshold: 0, failure_rate_threshold: 0, slow_call_rate_threshold: 0}
    services:
      up:
        upstream: $up
        routes:
          held:
            match: {path: /held}
            retry: {attempts: 1}   # bodies are held for a retry: nothing goes up before the end
"""


@pytest.fixture
async def upstream():
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


async def open_raw(proxy) -> Conn:
    return await Conn.open(proxy)


async def test_a_head_not_complete_in_time_is_408_and_closed(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")
    conn = await open_raw(proxy)
    conn.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Slow: lor")  # and then nothing
    status, headers, body = await conn.response()
    assert (status, headers["connection"]) == (408, "close")
    assert body == b'{"error": "request_timeout", "detail": "request head not complete in time"}'
    assert await conn.closed()
    assert upstream.received == []


async def test_a_body_that_stalls_before_anything_went_up_is_408(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")
    conn = await open_raw(proxy)
    conn.send(b"PUT /up/held HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nabc")
    status, _, body = await conn.response()
    assert (status, body) == (408, b'{"error": "request_timeout", "detail": "no request body byte in time"}')
    assert await conn.closed()
    assert upstream.received == []


async def test_a_body_that_stalls_after_its_head_went_up_aborts_the_upstream_call(start_proxy):
    eof_upstream = EofReader()
    await eof_upstream.start()
    try:
        proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{eof_upstream.port}")
        conn = await open_raw(proxy)
        conn.send(b"POST /up/orders HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nabc")
        status, _, _ = await conn.response()
        assert status == 408
        assert await conn.closed()
        await asyncio.wait_for(eof_upstream.done.wait(), 5)
        (data, ending), = eof_upstream.reads
        assert data.endswith(b"\r\n\r\nabc") and ending == "reset"  # never a complete request
    finally:
        eof_upstream.server.close()


async def test_an_idle_keep_alive_connection_is_closed(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")
    conn = await open_raw(proxy)
    conn.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\n\r\n")
    status, headers, _ = await conn.response()
    assert (status, headers.get("connection")) == (200, None)  # kept alive...
    assert await conn.closed()  # ... until idle_timeout_ms


async def test_one_connection_over_max_connections_is_closed_at_once_and_logged(start_proxy, upstream, caplog):
    proxy = await start_proxy(CONFIG.replace("idle_timeout_ms: 300", "idle_timeout_ms: 60000"),
                              up=f"http://127.0.0.1:{upstream.port}")
    caplog.set_level(logging.WARNING, logger="proxy.http.server")
    held = []
    for _ in range(3):
        conn = await open_raw(proxy)
        conn.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\n\r\n")
        assert (await conn.response())[0] == 200
        held.append(conn)
    extra = await open_raw(proxy)
    extra.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\n\r\n")
    assert await extra.closed()  # no answer, no hang
    assert [r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()] == [
        "connection refused: max_connections (3) are open (1 refused so far)"]
    held.pop().close()
    for _ in range(250):  # the proxy notices the close
        if len(proxy.server.connections) < 3:
            break
        await asyncio.sleep(0.02)
    again = await open_raw(proxy)
    again.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\n\r\n")
    assert (await again.response())[0] == 200
    for conn in [*held, again]:
        conn.close()


def _fit_probe(wanted: int, limit: int, *, unprivileged: bool = False) -> list[str]:
    probe = ("import logging, resource, sys; logging.basicConfig(stream=sys.stdout, format='%(message)s', "
             f"level=logging.INFO); resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
             f"from proxy.http.server import fit_open_files; print(fit_open_files({wanted}))")
    command = [sys.executable, "-c", probe]
    if unprivileged and _may_raise_hard_limit():
        command = ["setpriv", "--bounding-set=-sys_resource", "--", *command]  # CAP_SYS_RESOURCE off
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _may_raise_hard_limit() -> bool:
    """Whether a process started here may raise its hard open-file limit (CAP_SYS_RESOURCE)."""
    probe = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
             "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


def test_max_connections_is_lowered_to_fit_the_open_file_limit():
    # Unprivileged: the hard limit cannot be raised, so max_connections shrinks to fit it.
    assert _fit_probe(10000, 256, unprivileged=True) == [
        "max_connections lowered from 10000 to 96 to fit the open-file limit (256)", "96"]


@pytest.mark.skipif(not _may_raise_hard_limit(), reason="needs CAP_SYS_RESOURCE to raise a hard limit")
def test_a_privileged_proxy_raises_its_hard_limit_to_fit_max_connections():
    assert _fit_probe(10000, 256) == ["open-file limit raised from 256 to 20064", "10000"]


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as file:
        return int(file.read())


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2) to read a listener's backlog")
async def test_the_listen_backlog_has_room_for_max_connections_arriving_at_once(start_proxy, upstream):
    proxy = await start_proxy("storage: {path: $db}\nserver: {max_connections: 5000}\n"
                              "services: {up: {upstream: $up}}\n", up=f"http://127.0.0.1:{upstream.port}")
    port = proxy.app.server.port
    shown = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    backlog = int(shown.split()[2])  # a listener's Send-Q is its backlog
    wanted = max(1024, proxy.app.server.max_connections)  # 5,000 unless the open-file limit lowered it
    assert backlog == min(wanted, _somaxconn())
