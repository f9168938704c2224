"""The pure core imports nothing that does I/O or needs an event loop (STYLE §1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = ["proxy.core.clock", "proxy.config.model", "proxy.config.values", "proxy.core.window", "proxy.core.breaker",
        "proxy.core.bulkhead", "proxy.core.routing", "proxy.core.headers", "proxy.fastserver_parse"]
FORBIDDEN = ["asyncio", "aiohttp", "sqlite3", "aiosqlite", "prometheus_client"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module):
    probe = (f"import sys, {module}; "
             f"print(','.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "", "")
