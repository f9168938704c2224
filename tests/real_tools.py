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
