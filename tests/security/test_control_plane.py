"""The control plane against hostile input: HTML/JS in config names (refused by the loader)
and in request data (never unescaped in /status or /status.json; the page sets everything with
textContent under a strict CSP), the admin API without the right token (401 for every path and
method, the same answer each time, nothing changed), and YAML tags that would build objects
(a config error naming the line, nothing executed).
"""

from __future__ import annotations

import json
import logging

import pytest

from proxy.config.load import ConfigError, load_settings
from proxy.ops.logs import KeyValueFormatter
from tests.e2e.test_wire import Conn
from tests.security import CONFIG, RawUpstream, still_served

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
async def upstream():
    server = RawUpstream()
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(CONFIG, up=upstream.url)


@pytest.mark.parametrize("where", [
    "services:\n  up:\n    upstream: http://127.0.0.1:1\n    routes:\n      'x<script>': {}\n",
    "services:\n  'x<script>':\n    upstream: http://127.0.0.1:1\n",
    "services:\n  up:\n    upstream: http://127.0.0.1:1\n    routes:\n      'x\"onload=\"a': {}\n",
    "services:\n  'UP':\n    upstream: http://127.0.0.1:1\n",
    "services:\n  up:\n    upstream: http://127.0.0.1:1\n    routes:\n      'a b': {}\n",
])
def test_names_with_markup_are_refused_by_the_loader(write_config, where):
    with pytest.raises(ConfigError) as error:
        load_settings(write_config(where), {})
    (problem,) = error.value.problems
    assert ":5: services.up.routes." in problem or ":2: services." in problem
    assert "names use" in problem


async def test_request_data_never_appears_unescaped_on_the_status_page(proxy, upstream):
    conn = await Conn.open(proxy)
    for target, header in ((f"/up/{SCRIPT}", f"X-A: {SCRIPT}"), (f"/{SCRIPT}/x", f"User-Agent: {SCRIPT}"),
                           ("/up/%3Cscript%3E", 'Referer: "><img src=x onerror=alert(1)>')):
        conn.send(f"GET {target} HTTP/1.1\r\nHost: {SCRIPT}\r\n{header}\r\n\r\n".encode())
        await conn.response()
    conn.send(f"GET /status.json?x={SCRIPT} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    status, headers, body = await conn.response()
    assert (status, headers["content-type"].split(";")[0]) == (200, "application/json")
    json.loads(body)
    assert b"<script" not in body and b"<img" not in body and b"onerror" not in body
    conn.send(f"GET /status?x={SCRIPT} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    status, headers, body = await conn.response()
    conn.close()
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert b"alert(1)" not in body and b"onerror" not in body
    assert b"innerHTML" not in body  # request data is only ever set as text


async def test_an_unknown_service_named_like_markup_is_json_and_escaped(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(f"GET /{SCRIPT.replace('/', '%2F')}/x HTTP/1.1\r\nHost: p\r\n\r\n".encode())
    status, headers, body = await conn.response()
    conn.close()
    assert (status, headers["content-type"]) == (404, "application/json")
    assert json.loads(body)["error"] == "unknown_service"
    assert upstream.data == b""


ADMIN_PATHS = ["/admin/breakers/up.default/force-open", "/admin/breakers/up.default/force-closed",
               "/admin/breakers/up.default/disable", "/admin/breakers/up.default/reset", "/admin/reload",
               "/admin/breakers/nope/force-open", "/admin/breakers/up.default/explode", "/admin/",
               "/admin/breakers", "/admin/breakers/up.default/force-open?x=1", "/admin/breakers/up.default/"]
BAD_CREDENTIALS = [None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic YWRtaW46YWRtaW4=", "Token {token}",
                   "Bearer {token}x", "Bearer {short}", "bearer{token}", "Bearer\t{token}\x00"]


async def test_admin_without_the_right_token_is_401_everywhere_and_changes_nothing(proxy, upstream):
    token = proxy.app.control.admin_token
    async with proxy.session.get(proxy.url("/status.json")) as response:
        before = [(b["name"], b["state"], b["forced"] if "forced" in b else None)
                  for b in (await response.json())["breakers"]]
    answers = set()
    conn = await Conn.open(proxy)
    for path in ADMIN_PATHS:
        for method in ("POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
            for credentials in BAD_CREDENTIALS:
                extra = ""
                if credentials is not None:
                    value = credentials.format(token=token, short=token[:-1])
                    extra = f"Authorization: {value}\r\n"
                request = f"{method} {path} HTTP/1.1\r\nHost: p\r\n{extra}Content-Length: 0\r\n\r\n"
                conn.send(request.encode("latin-1"))
                status, headers, body = await conn.response(head_only=method == "HEAD")
                if status == 400:  # a NUL in a header value: refused by the parser, connection closed
                    assert "\x00" in extra
                    conn.close()
                    conn = await Conn.open(proxy)
                    continue
                assert status == 401, (method, path, credentials, status)
                headers.pop("date", None)
                answers.add((tuple(sorted(headers.items())), body if method != "HEAD" else None))
    conn.close()
    assert len({a for a in answers if a[1] is not None}) == 1  # the same answer, whatever was asked
    (headers, body), = [a for a in answers if a[1] is not None]
    assert json.loads(body) == {"error": "unauthorized", "detail": "Authorization: Bearer <admin token> required"}
    assert dict(headers)["www-authenticate"] == 'Bearer realm="circuit-proxy admin"'
    async with proxy.session.get(proxy.url("/status.json")) as response:
        after = [(b["name"], b["state"], b["forced"] if "forced" in b else None)
                 for b in (await response.json())["breakers"]]
    assert after == before and all(state == "closed" for _, state, _ in after)
    # The right token does work (so the 401s above were about the token).
    async with proxy.session.post(proxy.url("/admin/breakers/up.default/force-open"),
                                  headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
    assert upstream.data == b""


async def test_admin_lookalikes_are_not_admin_and_change_nothing(proxy, upstream):
    """`/admin` itself is not under `/admin/`: 404 like any path the control plane lacks; a
    dot-segment is refused before anything is looked at."""
    conn = await Conn.open(proxy)
    conn.send(b"POST /admin HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n")
    assert (await conn.response())[0] == 404
    conn.send(b"POST /admin/%2e%2e/admin/reload HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n")
    assert (await conn.response())[0] == 400
    assert await conn.closed()
    conn.close()
    async with proxy.session.get(proxy.url("/status.json")) as response:
        assert all(b["state"] == "closed" for b in (await response.json())["breakers"])
    assert upstream.data == b""


async def test_a_refused_admin_path_cannot_forge_log_lines(proxy, caplog):
    formatter = KeyValueFormatter()
    with caplog.at_level(logging.INFO, logger="proxy.ops.admin"):
        async with proxy.session.post(proxy.url(
                "/admin/x%0a2030-01-01T00:00:00.000Z%20WARNING%20proxy.ops.admin:%20forged")) as response:
            assert response.status == 401
    lines = [formatter.format(record) for record in caplog.records if record.name == "proxy.ops.admin"]
    assert lines and all("\n" not in line for line in lines)


# -- YAML tags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line", [
    ("server:\n  host: !!python/object/apply:os.system ['touch {marker}']\nservices: {{up: {{upstream: 'http://x:1'}}}}\n", 2),
    ("services:\n  up:\n    upstream: http://x:1\n    timeout_ms: !!python/object/apply:os.system ['touch {marker}']\n", 4),
    ("!!python/object/apply:os.system ['touch {marker}']\n", 1),
    ("server: !!python/object/new:os.system ['touch {marker}']\nservices: {{up: {{upstream: 'http://x:1'}}}}\n", 1),
    ("services:\n  up:\n    upstream: !!python/name:os.system\n", 3),
    ("services: !!python/object:proxy.config.model.Settings {{}}\n", 1),
])
def test_yaml_tags_that_build_objects_are_config_errors_and_run_nothing(write_config, tmp_path, text, line):
    marker = tmp_path / "pwned"
    path = write_config(text.format(marker=marker))
    with pytest.raises(ConfigError) as error:
        load_settings(path, {})
    assert not marker.exists()
    assert any(problem.startswith(f"{path}:{line}: ") for problem in error.value.problems), error.value.problems
    assert all("python/" in problem or "mapping" in problem or "tag" in problem
               for problem in error.value.problems if problem.startswith(f"{path}:{line}: "))


async def test_the_proxy_still_serves_after_all_that(proxy, upstream):
    await still_served(proxy, upstream)
