"""The real programs some tests drive (promtool, prometheus, chromium, the CLI): found, or a verdict.

`./dev test` installs them (Debian packages `prometheus` and `chromium`). Where one is missing a
test fails with the reason when CI is set, and is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

import pytest

PACKAGES = {"promtool": "prometheus", "prometheus": "prometheus", "chromium": "chromium"}


def require_tool(name: str) -> str:
    """The absolute path of `name`, or fail (CI) / skip (elsewhere) saying how to install it."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found:
        return found
    message = (f"{name} is not installed: install the Debian package '{PACKAGES.get(name, name)}' "
               "(./dev test does it)")
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """No process holds the port: a server (SO_REUSEADDR, as servers set it) can listen on it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def free_ports() -> tuple[int, int]:
    """A port for the proxy and a base port whose next four are free too (the fake upstreams'
    control port and four services), the two ranges apart."""
    port, base = free_port(), free_port()
    while not all(port_is_free(base + i) for i in range(5)) or port in range(base, base + 5):
        base = free_port()
    return port, base


async def read_until(stream: asyncio.StreamReader, needle: str, lines: list[str], timeout: float = 30) -> str:
    """The first line of a process's output containing `needle`; every line read goes to `lines`."""
    async def scan() -> str:
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"process ended before printing {needle!r}:\n" + "".join(lines))
            lines.append(raw.decode())
            if needle in lines[-1]:
                return lines[-1]
    return await asyncio.wait_for(scan(), timeout)
