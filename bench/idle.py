"""What idle keep-alive connections cost circuit-proxy in memory.

    python -m bench.idle [--connections 10000]

Starts the static upstream and circuit-proxy (`max_connections` as asked; the proxy lowers it
to fit its open-file limit and says so), opens the connections from this process in batches,
sends one proxied request on each (so each has been parsed and answered, as a shop's pooled
connection has), then holds them idle and reads the proxy's RSS: before, with all of them
open, and per 1,000 connections. Loopback only; everything is closed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

from bench import procs

BATCH = 500  # connections opened at once


def _config(workdir: Path, upstream_port: int, connections: int) -> Path:
    path = workdir / "idle.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: 8080, max_connections: {connections}, idle_timeout_ms: 600000}}\n"
        f"storage: {{path: {workdir / 'idle.db'}}}\n"
        "defaults: {max_concurrent: 0}\n"
        f"services:\n  bench:\n    upstream: http://127.0.0.1:{upstream_port}\n")
    return path


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /bench/small HTTP/1.1\r\nHost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        return reader, writer
    except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
        return None


async def measure(connections: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="circuit-proxy-idle-") as tmp:
        workdir = Path(tmp)
        upstream = procs.start_upstream([], workdir)
        circuit = procs.start_circuit_proxy([], workdir, _config(workdir, upstream.port, connections), {})
        held = []
        try:
            warm = await _open(circuit.port)  # pools and code paths warm before the baseline
            before = circuit.rss_mb()
            while len(held) < connections:
                batch = await asyncio.gather(*(_open(circuit.port)
                                               for _ in range(min(BATCH, connections - len(held)))))
                opened = [pair for pair in batch if pair is not None]
                held += opened
                if len(opened) < len(batch):
                    break  # the proxy's connection limit (or ours): measure what is open
            await asyncio.sleep(1.0)  # idle: nothing in flight, buffers settled
            after = circuit.rss_mb()
            for _, writer in held + ([warm] if warm else []):
                writer.close()
        finally:
            circuit.stop()
            upstream.stop()
    growth = (after or 0.0) - (before or 0.0)
    per_1k = growth / len(held) * 1000 if held else None
    return {"asked": connections, "held": len(held), "rss_before_mb": before, "rss_after_mb": after,
            "growth_mb": growth, "mb_per_1k": per_1k,
            "projected_10k_mb": (before or 0.0) + per_1k * 10 if per_1k is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.connections))
    print(f"idle keep-alive connections held: {result['held']} of {result['asked']}")
    print(f"proxy RSS: {result['rss_before_mb']:.1f} MB before, {result['rss_after_mb']:.1f} MB with them "
          f"open: {result['mb_per_1k']:.2f} MB per 1,000; 10,000 would take "
          f"{result['projected_10k_mb']:.0f} MB (target < 100 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
