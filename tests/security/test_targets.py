"""Hostile methods, request targets and paths through the real proxy: refused before routing
and never forwarded; what is forwarded goes byte for byte (percent-encoding kept, so a `%0d%0a`
stays three characters each). Traversal: the proxy never reads a file per request (canned
responses are loaded at start, named by the config, which must stay inside
`fallback_responses/`), and it refuses every path an upstream could resolve upwards: `..`,
`%2e`, an encoded slash or backslash making a dot-segment, and double encoding (`%252e%252e`,
refused: an upstream that decodes twice would otherwise climb). Placeholders of a static
fallback render request data without injecting headers or escaping their JSON/HTML string.
"""

from __future__ import annotations

import json

import pytest

from proxy.config.load import ConfigError, load_settings
from tests.e2e.test_wire import Conn
from tests.security import CONFIG, RawUpstream, refused, still_served


@pytest.fixture
async def upstream():
    server = RawUpstream()
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(CONFIG, up=upstream.url)


def line(method: bytes, target: bytes) -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n"


async def forwarded(proxy, upstream: RawUpstream, request: bytes) -> bytes:
    """The request is answered 200 by the upstream; the target the upstream got."""
    conn = await Conn.open(proxy)
    conn.send(request)
    status, _, body = await conn.response()
    conn.close()
    assert (status, body) == (200, b"upstream ok")
    (received,) = upstream.requests
    assert upstream.errors == []
    upstream.clear()
    return received.target


# -- methods --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [b"G@T", b"GET\x00", b"G\xc3\x89T", b"get", b"Get", b"FOO", b"G(T)",
                                    b"GE T", b"", b"GET/1.1"])
async def test_invalid_or_unknown_methods_are_400(proxy, upstream, method):
    """llhttp knows a fixed list of methods, case-sensitive: anything else (a lower-case
    `get`, an unregistered token) is refused, consistently, never passed on with its case
    changed."""
    await refused(proxy, upstream, line(method, b"/up/x"), 400)


async def test_known_methods_are_forwarded_as_they_are(proxy, upstream):
    for method in (b"PROPFIND", b"PURGE", b"PATCH", b"DELETE", b"OPTIONS"):
        conn = await Conn.open(proxy)
        conn.send(line(method, b"/up/m"))
        assert (await conn.response())[0] == 200
        conn.close()
        assert upstream.requests[-1].method == method
        assert upstream.data.startswith(method + b" /m HTTP/1.1\r\n")
        upstream.clear()


# -- targets --------------------------------------------------------------------------------------

TARGETS = {
    "asterisk with GET": (b"GET", b"*"),
    "asterisk with OPTIONS (never proxied)": (b"OPTIONS", b"*"),
    "absolute-form": (b"GET", b"http://evil/x"),
    "absolute-form at the upstream": (b"GET", b"http://127.0.0.1:1/up/x"),
    "authority-form with GET": (b"GET", b"evil:443"),
    "fragment": (b"GET", b"/up/x#frag"),
    "fragment after the query": (b"GET", b"/up/x?a=1#frag"),
    "non-ASCII byte": (b"GET", b"/up/\xff"),
    "UTF-8 in the path": (b"GET", "/up/é".encode()),
    "UTF-8 in the query": (b"GET", "/up/x?q=é".encode()),
    "raw space": (b"GET", b"/up/a b"),
    "empty": (b"GET", b""),
}


@pytest.mark.parametrize("method, target", TARGETS.values(), ids=TARGETS.keys())
async def test_targets_that_are_not_origin_form_are_400(proxy, upstream, method, target):
    await refused(proxy, upstream, line(method, target), 400)


async def test_connect_is_refused_and_the_tunnel_bytes_are_dropped(proxy, upstream):
    await refused(proxy, upstream, b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n"
                  + b"GET /up/inside-the-tunnel HTTP/1.1\r\nHost: p\r\n\r\n", 400)


async def test_double_slashes_are_forwarded_raw_not_normalised(proxy, upstream):
    """`//x` after the service is an ordinary (empty) segment: forwarded as sent; a target that
    starts with `//` names the empty service, which does not exist."""
    assert await forwarded(proxy, upstream, line(b"GET", b"/up//x//y")) == b"//x//y"
    conn = await Conn.open(proxy)
    conn.send(line(b"GET", b"//up/x"))
    assert (await conn.response())[0] == 404
    conn.close()
    assert upstream.data == b""


# -- path traversal -----------------------------------------------------------------------------------

TRAVERSALS = [
    b"/up/../..", b"/up/..", b"/up/./x", b"/up/x/../../fallback_responses/service-unavailable.json",
    b"/../fallback_responses/service-unavailable.json", b"/up/%2e%2e/x", b"/up/%2E%2e", b"/up/.%2e/x",
    b"/up/%2e/x", b"/up/..%2fx", b"/up/..%2Fx", b"/up/x/..%2f..%2ffallback_responses",
    b"/up/%2e%2e%2fx", b"/up/..%5cx", b"/up/..%5Cx", b"/up/x%5c..%5cy", b"/up/..\\x", b"/up/x\\..\\y",
    b"/up/%252e%252e/x", b"/up/%252E%252E%252Fx", b"/up/..?q=1", b"/up/%2e%2e?q=/x",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=[t.decode() for t in TRAVERSALS])
async def test_dot_segments_in_any_encoding_are_400(proxy, upstream, target):
    _, _, body = await refused(proxy, upstream, line(b"GET", target), 400)
    assert b"dot-segment" in body


async def test_dots_that_are_not_segments_are_forwarded_raw(proxy, upstream):
    for target in (b"/up/a..b", b"/up/...", b"/up/.well-known/x", b"/up/x.json", b"/up/%2e%2e%2e",
                   b"/up/a%2fb", b"/up/x?path=../../etc", b"/up/%25"):
        assert await forwarded(proxy, upstream, line(b"GET", target)) == target[3:]


async def test_fallback_files_named_outside_fallback_responses_are_config_errors(write_config):
    for name in ("../config/breakers.yaml", "/etc/passwd", "../../etc/passwd", "x/../../y.json"):
        path = write_config(f"""
            services:
              up:
                upstream: http://127.0.0.1:1
                routes:
                  default:
                    fallback: {{type: static, file: "{name}"}}
        """)
        with pytest.raises(ConfigError) as error:
            load_settings(path, {})
        assert any("services.up.routes.default.fallback.file" in p for p in error.value.problems), (
            name, error.value.problems)


# -- CR/LF injection -----------------------------------------------------------------------------------

async def test_encoded_cr_lf_stays_encoded_and_injects_nothing(proxy, upstream):
    target = b"/up/x%0d%0aX-Injected:%20yes?a=%0D%0AX-Injected:%20yes%0d%0a%0d%0aGET%20/smuggled"
    conn = await Conn.open(proxy)
    conn.send(b"GET " + target + b" HTTP/1.1\r\nHost: p\r\nX-A: a%0d%0aX-Injected: yes\r\n"
              b"X-B: \\r\\nX-Injected: yes\r\n\r\n")
    assert (await conn.response())[0] == 200
    conn.close()
    (received,) = upstream.requests
    assert received.target == target[3:]
    assert received.header("x-a") == [b"a%0d%0aX-Injected: yes"]
    assert received.header("x-b") == [b"\\r\\nX-Injected: yes"]
    assert b"x-injected" not in received.names and b"smuggled" not in received.names
    assert upstream.data.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("header", [b"X-A: a\rX-Injected: yes", b"X-A: a\nX-Injected: yes",
                                    b"X-A: a\r\n\r\nGET /up/smuggled HTTP/1.1\r\nHost: p"])
async def test_raw_cr_lf_in_a_header_is_400_or_its_own_line(proxy, upstream, header):
    conn = await Conn.open(proxy)
    conn.send(b"GET /up/x HTTP/1.1\r\nHost: p\r\n" + header + b"\r\n\r\n")
    status, _, _ = await conn.response()
    if header.count(b"\r\n") == 0:
        assert status == 400
        assert await conn.closed()
        assert upstream.data == b""
    else:  # a CRLF ends a field: what follows is a request of its own, served as one
        assert status == 200
        assert (await conn.response())[0] == 200
        assert [r.target for r in upstream.requests] == [b"/x", b"/smuggled"]
    conn.close()
    upstream.clear()
    await still_served(proxy, upstream)


# -- static fallback placeholders render request data safely ---------------------------------------

ECHO = {
    "status": 503,
    "headers": {"Content-Type": "application/json", "X-Seg": "{{segment.0}}", "X-Hdr": "{{header.x-a}}",
                "X-Query": "{{query.q}}", "X-Path": "{{path}}"},
    "body": {"seg": "{{segment.0}}", "hdr": "{{header.x-a}}", "query": "{{query.q}}", "path": "{{path}}",
             "text": "seg={{segment.0}} hdr={{header.x-a}}"},
}


async def test_static_fallback_placeholders_cannot_inject_headers_or_escape_json(start_proxy, config_dir,
                                                                                upstream):
    (config_dir / "fallback_responses" / "echo.json").write_text(json.dumps(ECHO))
    (config_dir / "fallback_responses" / "echo.html").write_text(
        "<p>{{segment.0}}</p><p title=\"{{header.x-a}}\">{{query.q}}</p>")
    proxy = await start_proxy(CONFIG + """
      dead:
        upstream: http://127.0.0.1:1
        connect_timeout_ms: 200
        routes:
          page:
            match: {path: /page}
            fallback: {type: static, file: echo.html}
          default:
            fallback: {type: static, file: echo.json}
    """, up=upstream.url)
    segment = "%0d%0aSet-Cookie:%20evil=1%0d%0a%0d%0a%22%7D%2C%22admin%22%3Atrue%2C%22x%22%3A%22"
    query = "%0aLocation:%20http://evil%0a\"},{\"admin\":true}//<script>alert(1)</script>"
    header = '"},"admin":true,"x":"\\" <script>alert(1)</script>'
    request = (f"GET /dead/{segment}?q={query.replace(' ', '%20')} HTTP/1.1\r\nHost: p\r\n"
               f"X-A: {header}\r\nAuthorization: Bearer s3cret\r\n\r\n").encode()
    conn = await Conn.open(proxy)
    conn.send(request)
    status, headers, body = await conn.response()
    assert status == 503 and headers["x-fallback"] == "static"
    assert "set-cookie" not in headers and "location" not in headers
    assert "\r" not in headers["x-seg"] and "Set-Cookie" in headers["x-seg"]  # only as text
    document = json.loads(body)
    assert set(document) == {"seg", "hdr", "query", "path", "text"}
    assert document["seg"] == '\r\nSet-Cookie: evil=1\r\n\r\n"},"admin":true,"x":"'
    assert document["hdr"] == header
    assert document["query"].startswith('\nLocation: http://evil\n"},{"admin":true}')
    conn.send(f"GET /dead/page/<b>x</b>?q=<script>alert(1)</script> HTTP/1.1\r\nHost: p\r\n"
              f"X-A: \"><script>alert(2)</script>\r\n\r\n".encode())
    status, headers, body = await conn.response()
    conn.close()
    assert status == 200 and b"<script>" not in body and b"<b>" not in body
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body and b"&quot;&gt;&lt;script&gt;" in body
    assert upstream.data == b""
    await still_served(proxy, upstream)
