"""Where circuit-proxy's CPU goes on the healthy path: py-spy samples the proxy under wrk load.

    ./dev bench-profile [--connections 50] [--seconds 10] [--body small|large] [--out DIR]

Starts the static upstream and circuit-proxy (one core each when taskset is there), drives
wrk at N keep-alive connections and lets py-spy sample the proxy (100 samples/s, `--native`
off, idle frames dropped). Writes `<out>/profile-<time>.svg` (a flame graph) and
`<out>/profile-<time>.txt`: CPU µs per request from /proc, then the functions by own time and
by total time, as shares of the samples. Loopback only; everything stops at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs

ROOT = Path(__file__).resolve().parent.parent


def _config(workdir: Path, upstream_port: int) -> Path:
    path = workdir / "profile.yaml"
    path.write_text(
        "server: {host: 127.0.0.1, port: 8080}\n"
        f"storage: {{path: {workdir / 'profile.db'}}}\n"
        "defaults: {max_concurrent: 0}\n"
        f"services:\n  bench:\n    upstream: http://127.0.0.1:{upstream_port}\n")
    return path


def _function(frame: str) -> str:
    """"f (path/file.py:12)" → "f (path/file.py)"."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _summarise(collapsed: Path, top: int = 40) -> list[str]:
    """Own and total time per function from py-spy's collapsed stacks ("a;b;c count")."""
    own: collections.Counter[str] = collections.Counter()
    own_fn: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        own_fn[_function(frames[-1])] += count
        for frame in set(frames):
            total[frame] += count
    out = [f"samples: {samples}", "", "own time by function (share of samples):"]
    out += [f"  {100 * n / samples:5.1f} %  {name}" for name, n in own_fn.most_common(top)]
    out += ["", "own time by line:"]
    out += [f"  {100 * n / samples:5.1f} %  {name}" for name, n in own.most_common(top)]
    out += ["", "total time, including callees:"]
    out += [f"  {100 * n / samples:5.1f} %  {name}" for name, n in total.most_common(top)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--body", choices=("small", "large"), default="small")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists() or not shutil.which("wrk"):
        print("needs py-spy (pip install py-spy) and wrk (Debian: wrk)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    proxy_prefix, load_prefix = procs.pinning()
    with tempfile.TemporaryDirectory(prefix="circuit-proxy-profile-") as tmp:
        workdir = Path(tmp)
        upstream = procs.start_upstream(load_prefix, workdir)
        circuit = procs.start_circuit_proxy(proxy_prefix, workdir, _config(workdir, upstream.port), {})
        try:
            path = "/bench/" + ("large" if args.body == "large" else "small")
            url = f"http://127.0.0.1:{circuit.port}{path}"
            subprocess.run([*load_prefix, "wrk", "-t1", "-c", str(args.connections), "-d", "2s", url],
                           capture_output=True, check=True)  # warm: connections, pools, caches
            collapsed = workdir / "stacks.txt"
            spy = subprocess.Popen([py_spy, "record", "-p", str(circuit.pid), "-r", str(args.rate), "-d",
                                    str(int(args.seconds) + 1), "-f", "raw", "-o", str(collapsed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # py-spy attached
            cpu_before = circuit.cpu_seconds()
            done = subprocess.run([*load_prefix, "wrk", "-t1", "-c", str(args.connections), "-d",
                                   f"{args.seconds:g}s", url], capture_output=True, text=True, check=True)
            cpu = (circuit.cpu_seconds() or 0.0) - (cpu_before or 0.0)
            spy.wait(timeout=args.seconds + 30)
            requests = next((int(line.split()[0]) for line in done.stdout.splitlines()
                             if "requests in" in line), 0)
            lines = [f"# profile {stamp}: {args.connections} connections, {args.body} body, "
                     f"{args.seconds:g} s", "",
                     f"requests: {requests}, proxy CPU: {cpu:.2f} s, "
                     f"CPU per request: {1e6 * cpu / max(requests, 1):.1f} µs (py-spy's own "
                     "sampling adds a little)", ""]
            lines += _summarise(collapsed)
            text_out = args.out / f"profile-{stamp}.txt"
            text_out.write_text("\n".join(lines) + "\n")
            svg = args.out / f"profile-{stamp}.svg"
            _flamegraph(collapsed, svg)
            print("\n".join(lines[:6]))
            print(f"wrote {text_out} and {svg}")
        finally:
            circuit.stop()
            upstream.stop()
    return 0


def _flamegraph(collapsed: Path, svg: Path) -> None:
    """A small self-contained SVG icicle graph of the collapsed stacks (no external tool)."""
    tree: dict = {"n": 0, "kids": {}}
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        node = tree
        node["n"] += count
        for frame in stack.split(";"):
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count
    width, row = 1600.0, 16
    rects: list[str] = []
    depth_max = 0

    def draw(node: dict, name: str, x: float, depth: int) -> None:
        nonlocal depth_max
        w = width * node["n"] / max(tree["n"], 1)
        if w < 0.5:
            return
        depth_max = max(depth_max, depth)
        label = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        hue = 20 + (hash(name.split(" ")[0]) % 40)
        share = 100 * node["n"] / max(tree["n"], 1)
        rects.append(f'<g><title>{label} ({share:.1f} %)</title><rect x="{x:.1f}" y="{depth * row}" '
                     f'width="{w:.1f}" height="{row - 1}" fill="hsl({hue},80%,60%)"/>'
                     + (f'<text x="{x + 2:.1f}" y="{depth * row + 12}" font-size="11">'
                        f'{label[: int(w / 7)]}</text>' if w > 30 else "") + "</g>")
        cx = x
        for kid_name, kid in sorted(node["kids"].items(), key=lambda kv: -kv[1]["n"]):
            draw(kid, kid_name, cx, depth + 1)
            cx += width * kid["n"] / max(tree["n"], 1)

    cx = 0.0
    for name, kid in sorted(tree["kids"].items(), key=lambda kv: -kv[1]["n"]):
        draw(kid, name, cx, 0)
        cx += width * kid["n"] / max(tree["n"], 1)
    height = (depth_max + 1) * row
    svg.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
                   f'font-family="monospace">{"".join(rects)}</svg>\n')


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
