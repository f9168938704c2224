"""Processes under test: start them pinned to a core, wait until they listen, read their CPU
time and memory from /proc, stop them. Linux-only where it reads /proc (it says so, and the
figures are then left out)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pinning() -> tuple[list[str], list[str]]:
    """(prefix for the proxy under test, prefix for load and upstream): taskset onto cores 1 and 0."""
    if shutil.which("taskset") and cpus() >= 2:
        return ["taskset", "-c", "1"], ["taskset", "-c", "0"]
    return [], []


def raise_priority(niceness: int = -10) -> list[str]:
    """Run what is measured ahead of unrelated work on a shared machine (needs root or
    CAP_SYS_NICE; otherwise nothing changes). Returns the prefix for child processes."""
    try:
        os.nice(niceness)  # this process: the steady-rate generator runs here
    except (OSError, AttributeError):
        return []
    return ["nice"]  # children inherit our niceness


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    extra: dict = field(default_factory=dict)
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the process (all threads) so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mb(self) -> float | None:
        return _status_kb(self.pid, "VmRSS")

    def reset_peak(self) -> bool:
        """Reset VmHWM (Linux ≥ 4.0: writing 5 to clear_refs)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_mb(self) -> float | None:
        return _status_kb(self.pid, "VmHWM")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _status_kb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_upstream(prefix: list[str], logdir: Path, name: str = "upstream") -> Proc:
    log = logdir / f"{name}.log"
    popen = subprocess.Popen([*prefix, sys.executable, "-m", "bench.upstream", "--port", "0",
                              "--control-port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=log.open("w"), text=True)
    line = popen.stdout.readline().split() if popen.stdout else []
    if len(line) != 3 or line[0] != "ready":
        popen.kill()
        raise RuntimeError(f"{name} did not start: {line!r}; see {log}")
    return Proc(name, popen, int(line[1]), {"control_port": int(line[2])}, log)


def start_naive(prefix: list[str], logdir: Path, upstream_port: int, timeout_s: float,
                name: str = "naive") -> Proc:
    log = logdir / f"{name}.log"
    popen = subprocess.Popen([*prefix, sys.executable, "-m", "bench.naive_proxy", "--port", "0",
                              "--upstream", f"http://127.0.0.1:{upstream_port}", "--timeout",
                              str(timeout_s)], cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"),
                             text=True)
    line = popen.stdout.readline().split() if popen.stdout else []
    if len(line) != 2 or line[0] != "ready":
        popen.kill()
        raise RuntimeError(f"{name} did not start: {line!r}; see {log}")
    return Proc(name, popen, int(line[1]), {}, log)


def start_bare_relay(prefix: list[str], logdir: Path, upstream_port: int, name: str = "bare") -> Proc:
    """bench/bare_relay.py: the uvloop + httptools floor, no features. `upstream_port` 0: the
    open path's floor (every request answered 503 at once)."""
    log = logdir / f"{name}.log"
    where = ["--upstream-port", str(upstream_port)] if upstream_port else ["--answer"]
    popen = subprocess.Popen([*prefix, sys.executable, "-m", "bench.bare_relay", "--port", "0", *where],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    line = popen.stdout.readline().split() if popen.stdout else []
    if len(line) != 2 or line[0] != "ready":
        popen.kill()
        raise RuntimeError(f"{name} did not start: {line!r}; see {log}")
    return Proc(name, popen, int(line[1]), {}, log)


def start_circuit_proxy(prefix: list[str], logdir: Path, config: Path, env: dict[str, str], *,
                        root: Path = ROOT, name: str = "circuit-proxy") -> Proc:
    """`python -m proxy run` from `root` (another checkout, to compare revisions)."""
    port = free_port()
    log = logdir / f"{name}.log"
    popen = subprocess.Popen([*prefix, sys.executable, "-m", "proxy", "run", "--config", str(config),
                              "--port", str(port)], cwd=root, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONPATH": str(root)})
    wait_listening(port, proc=popen)
    return Proc(name, popen, port, {}, log)


async def http_get(port: int, path: str, headers: dict[str, str] | None = None,
                   method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A one-off request on its own connection (control calls, tripping breakers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    for key, value in (headers or {}).items():
        head += f"{key}: {value}\r\n"
    if method == "POST":
        head += "Content-Length: 0\r\n"
    writer.write(head.encode() + b"\r\n")
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers_out = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers_out[key.strip().lower()] = value.strip()
    if headers_out.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return status, headers_out, body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


async def upstream_control(proc: Proc, action: str) -> dict:
    _, _, body = await http_get(proc.extra["control_port"], f"/{action}")
    return json.loads(body)
