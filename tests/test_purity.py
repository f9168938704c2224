"""The pure folders import nothing that does I/O or needs an event loop (README, "Layout").

Every module of proxy/core and proxy/config, found by folder (a new module is checked without
being listed), is imported alone in a fresh interpreter, and nothing forbidden may be loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[1] / "proxy"
PURE = sorted(f"proxy.{path.parent.name}.{path.stem}".removesuffix(".__init__")
              for folder in ("core", "config") for path in (PROXY / folder).glob("*.py"))
FORBIDDEN = ["asyncio", "aiohttp", "sqlite3", "aiosqlite", "asyncpg", "prometheus_client", "httptools",
             "ssl"]


def test_the_pure_folders_are_found():
    assert {"proxy.core.breaker", "proxy.core.outcome", "proxy.config.load"} <= set(PURE)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module):
    probe = (f"import sys, {module}; "
             f"print(','.join(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "", "")
