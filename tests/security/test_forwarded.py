"""Spoofed X-Forwarded-* and `server.trusted_proxies`.

Without the setting the proxy appends the client's address to any incoming X-Forwarded-For
(§2 fixes that), so a client can put any address first (what most upstreams log or
rate-limit by). With `trusted_proxies` written:
- a direct client outside every listed network (`[]`: everyone) has its X-Forwarded-For /
  -Host / -Proto dropped and replaced by what the proxy saw;
- a client inside one (a load balancer in front) gets its X-Forwarded-For appended to.
X-Forwarded-Host and -Proto are always the proxy's own.
Trust is decided once per connection; fallbacks (static placeholders, queued requests' stored
headers) see the same headers the upstream would.
"""

from __future__ import annotations

import json

import pytest

from proxy.config.load import ConfigError, parse_settings
from proxy.core.headers import client_is_trusted, upstream_request_head, upstream_request_headers
from tests.e2e.test_wire import Conn
from tests.security import CONFIG, RawUpstream

SPOOF = ("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7, 8.8.8.8\r\n"
         "X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n")


@pytest.fixture
async def upstream():
    server = RawUpstream()
    await server.start()
    yield server
    server.stop()


def config(trusted: str | None) -> str:
    server = "server: {max_body_bytes: 100000"
    if trusted is not None:
        server += f", trusted_proxies: {trusted}"
    return CONFIG.replace("server: {max_body_bytes: 100000", server)


async def forwarded_headers(proxy, upstream: RawUpstream) -> dict[str, list[bytes]]:
    conn = await Conn.open(proxy)
    conn.send(f"GET /up/x HTTP/1.1\r\nHost: shop.example\r\n{SPOOF}\r\n".encode())
    assert (await conn.response())[0] == 200
    conn.close()
    (received,) = upstream.requests
    upstream.clear()
    return {name: received.header(name) for name in ("x-forwarded-for", "x-forwarded-host", "x-forwarded-proto")}


PROXY_SAW = {"x-forwarded-for": [b"127.0.0.1"], "x-forwarded-host": [b"shop.example"],
             "x-forwarded-proto": [b"http"]}


async def test_without_the_setting_every_client_is_appended_to_as_section_2_says(start_proxy, upstream):
    proxy = await start_proxy(config(None), up=upstream.url)
    assert await forwarded_headers(proxy, upstream) == {
        **PROXY_SAW, "x-forwarded-for": [b"6.6.6.6, 7.7.7.7, 8.8.8.8, 127.0.0.1"]}


@pytest.mark.parametrize("trusted", ["[]", "[10.0.0.0/8, '::1']", "[127.0.0.2/32]"])
async def test_an_untrusted_client_cannot_spoof_forwarded_headers(start_proxy, upstream, trusted):
    proxy = await start_proxy(config(trusted), up=upstream.url)
    assert await forwarded_headers(proxy, upstream) == PROXY_SAW


@pytest.mark.parametrize("trusted", ["[127.0.0.0/8]", "[10.0.0.0/8, 127.0.0.1]", "['127.0.0.1/24']"])
async def test_a_trusted_proxy_gets_its_x_forwarded_for_appended_to(start_proxy, upstream, trusted):
    proxy = await start_proxy(config(trusted), up=upstream.url)
    assert await forwarded_headers(proxy, upstream) == {
        **PROXY_SAW, "x-forwarded-for": [b"6.6.6.6, 7.7.7.7, 8.8.8.8, 127.0.0.1"]}


ECHO = {"status": 503, "headers": {"Content-Type": "application/json"},
        "body": {"xff": "{{header.x-forwarded-for}}", "xfh": "{{header.x-forwarded-host}}"}}

DEAD = """
      dead:
        upstream: http://127.0.0.1:1
        connect_timeout_ms: 200
        routes:
          queued:
            match: {path: /queued}
            fallback: {type: queue, max_depth: 10, max_attempts: 1}
          default:
            fallback: {type: static, file: xff.json}
"""


@pytest.mark.parametrize("trusted, xff", [("[]", "127.0.0.1"),
                                          ("[127.0.0.0/8]", "6.6.6.6, 7.7.7.7, 8.8.8.8, 127.0.0.1")])
async def test_fallbacks_see_the_same_forwarded_headers(start_proxy, upstream, config_dir, trusted, xff):
    (config_dir / "fallback_responses" / "xff.json").write_text(json.dumps(ECHO))
    proxy = await start_proxy(config(trusted) + DEAD, up=upstream.url)
    conn = await Conn.open(proxy)
    conn.send(f"GET /dead/x HTTP/1.1\r\nHost: shop.example\r\n{SPOOF}\r\n".encode())
    status, _, body = await conn.response()
    assert status == 503
    seen = json.loads(body)
    if trusted == "[]":
        assert seen == {"xff": None, "xfh": None}  # never shown what an untrusted client claims
    else:
        assert seen == {"xff": "6.6.6.6", "xfh": "evil.example"}  # {{header.NAME}}: the first
    conn.send(f"POST /dead/queued HTTP/1.1\r\nHost: shop.example\r\n{SPOOF}Content-Length: 2\r\n\r\n{{}}".encode())
    status, headers, _ = await conn.response()
    conn.close()
    assert status == 202
    (stored,) = await proxy.app.storage.fetchall("SELECT headers FROM queue_items")
    stored_headers = {name.lower(): value for name, value in json.loads(stored[0])}
    assert stored_headers["x-forwarded-for"] == xff
    assert stored_headers["x-forwarded-host"] == "shop.example"
    assert stored_headers.get("x-forwarded-proto", "http") == "http"


# -- the setting ----------------------------------------------------------------------------------

def settings(server: str):
    return parse_settings(f"server:\n{server}\nservices: {{up: {{upstream: 'http://127.0.0.1:1'}}}}\n",
                          source="c.yaml", environ={})


def test_trusted_proxies_are_networks_normalised_and_default_to_not_set():
    assert settings("  port: 1").server.trusted_proxies is None
    assert settings("  trusted_proxies: []").server.trusted_proxies == ()
    assert settings("  trusted_proxies: [10.1.2.3/8, 192.168.0.7, '2001:db8::1/32', '::1', 10.0.0.0/8]"
                    ).server.trusted_proxies == ("10.0.0.0/8", "192.168.0.7/32", "2001:db8::/32", "::1/128")


def test_trusted_proxies_problems_name_the_line_and_entry():
    with pytest.raises(ConfigError) as error:
        settings("  trusted_proxies:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n    - localhost\n    - 7\n    - ''")
    assert error.value.problems == [
        "c.yaml:4: server.trusted_proxies[1]: not an IPv4 or IPv6 network (CIDR): '10.0.0.0/33'",
        "c.yaml:5: server.trusted_proxies[2]: not an IPv4 or IPv6 network (CIDR): 'localhost'",
        "c.yaml:6: server.trusted_proxies[3]: not a non-empty string: 7",
        "c.yaml:7: server.trusted_proxies[4]: not a non-empty string: ''",
    ]
    with pytest.raises(ConfigError) as error:
        settings("  trusted_proxies: 10.0.0.0/8")
    assert error.value.problems == [
        "c.yaml:2: server.trusted_proxies: must be a list of IP networks (CIDR), e.g. [10.0.0.0/8]"]


def test_client_is_trusted():
    proxies = ("10.0.0.0/8", "2001:db8::/32")
    assert client_is_trusted(b"10.2.3.4", proxies) and client_is_trusted("10.2.3.4", proxies)
    assert client_is_trusted(b"::ffff:10.2.3.4", proxies)  # IPv4 on a dual-stack socket
    assert client_is_trusted(b"2001:db8::5", proxies)
    assert not client_is_trusted(b"11.0.0.1", proxies)
    assert not client_is_trusted(b"2001:db9::5", proxies)
    assert not client_is_trusted(b"10.2.3.4", ())
    assert not client_is_trusted(None, proxies) and not client_is_trusted(b"not-an-ip", proxies)


def test_the_pure_header_builders_drop_an_untrusted_x_forwarded_for():
    fields = [(b"X-Forwarded-For", b"x-forwarded-for", b"6.6.6.6"), (b"X-Forwarded-Host", b"x-forwarded-host", b"e"),
              (b"Accept", b"accept", b"*/*")]
    head = upstream_request_head(b"GET", b"/", fields, None, host=b"h", client_ip=b"1.2.3.4", proto=b"http",
                                 forwarded_host=b"shop", trust_forwarded=False)
    assert head == (b"GET / HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4\r\n"
                    b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: shop\r\n\r\n")
    trusted = upstream_request_head(b"GET", b"/", fields, None, host=b"h", client_ip=b"1.2.3.4", proto=b"http",
                                    forwarded_host=b"shop", trust_forwarded=True)
    assert b"X-Forwarded-For: 6.6.6.6, 1.2.3.4\r\n" in trusted
    pairs = [("X-Forwarded-For", "6.6.6.6"), ("Accept", "*/*")]
    assert upstream_request_headers(pairs, [], client_ip="1.2.3.4", proto="http", host="shop",
                                    trust_forwarded=False) == [
        ("Accept", "*/*"), ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "shop")]
