"""The bench's own instruments: the socket-free hot-path measure and the floors it compares
against answer as they claim (the figures themselves belong to `python -m bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import hotpath
from bench.bare_relay import OPEN_ANSWER

ROOT = Path(__file__).resolve().parents[2]


async def test_the_hot_path_measure_runs_real_keep_alive_exchanges_and_rejections():
    healthy = await hotpath._measure(300, 2, open_breaker=False)
    rejected = await hotpath._measure(300, 2, open_breaker=True)
    assert len(healthy) == len(rejected) == 2
    assert all(us > 0 for us in healthy + rejected)


def test_the_open_paths_floor_answers_a_well_framed_503():
    head, _, body = OPEN_ANSWER.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)


def test_the_bare_responder_serves_one_answer_per_request_on_a_kept_connection():
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_relay", "--port", "0", "--answer"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split() if proc.stdout else []
        assert line[0] == "ready"
        import socket
        with socket.create_connection(("127.0.0.1", int(line[1])), timeout=5) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while len(data) < 2 * len(OPEN_ANSWER):
                chunk = sock.recv(65536)
                assert chunk, "closed early"
                data += chunk
        assert data == OPEN_ANSWER * 2
    finally:
        proc.kill()
        proc.wait()
