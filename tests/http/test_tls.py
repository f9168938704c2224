"""http/tls: client contexts against a real HTTPS upstream on loopback (trustme CAs, §1a `tls`).

Each test connects with a plain `asyncio.open_connection` and a hand-written HTTP/1.1 GET, so
what passes or fails is the context alone, not a client library's own TLS defaults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import textwrap
from collections.abc import AsyncIterator

import pytest
import trustme

from proxy.config.load import load_settings
from proxy.config.model import Service, TlsSettings
from proxy.http.tls import TlsError, client_context, client_contexts, server_hostname
from tests.tls_upstream import TlsUpstream, write_ca, write_client_cert

ITEM = {"sku": "SKU-001", "available": 5}


async def get(port: int, context: ssl.SSLContext, host: str = "127.0.0.1",
              path: str = "/stock/SKU-001") -> tuple[int, dict]:
    """Status and JSON body of one GET over a fresh TLS connection to 127.0.0.1:port."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_hostname(host)), 10)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionResetError("closed without an answer")
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def upstream(ca: trustme.CA) -> AsyncIterator[TlsUpstream]:
    async with TlsUpstream(ca) as running:
        yield running


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_shops_ca_is_trusted_for_an_ip_or_a_name(upstream, tmp_path, host):
    context = client_context(TlsSettings(ca_file=upstream.write_ca(tmp_path / "ca.pem")), "inventory")
    assert await get(upstream.port, context, host) == (200, ITEM)
    assert [(r.method, r.path, r.client_names) for r in upstream.requests] == [
        ("GET", "/stock/SKU-001", ())]


async def test_a_certificate_from_another_ca_is_refused(upstream, tmp_path):
    other = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        await get(upstream.port, client_context(TlsSettings(ca_file=other), "inventory"))
    assert upstream.requests == []


async def test_without_tls_settings_the_system_store_is_used_and_a_private_ca_is_refused(upstream):
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(upstream.port, client_context(None, "inventory"))
    assert upstream.requests == []


@pytest.mark.parametrize(("host", "reason"), [("127.0.0.1", "IP address mismatch"),
                                               ("localhost", "Hostname mismatch")])
async def test_a_certificate_for_another_name_is_refused(ca, tmp_path, host, reason):
    async with TlsUpstream(ca, names=("shop.example",)) as upstream:
        context = client_context(TlsSettings(ca_file=write_ca(ca, tmp_path / "ca.pem")), "inventory")
        with pytest.raises(ssl.SSLCertVerificationError, match=reason):
            await get(upstream.port, context, host)
        assert upstream.requests == []


async def test_verify_false_accepts_an_unknown_ca_and_another_name_and_says_so(ca, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.http.tls")
    context = client_context(TlsSettings(verify=False), "inventory")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "services.inventory.tls.verify is false: the upstream's certificate and host "
                    "name are not checked (service=inventory)")]
    async with TlsUpstream(ca, names=("shop.example",)) as upstream:
        assert await get(upstream.port, context) == (200, ITEM)
        assert len(upstream.requests) == 1


def test_defaults_verify_the_chain_and_the_name_with_tls_1_2_at_least():
    context = client_context(TlsSettings(), "inventory")
    assert (context.verify_mode, context.check_hostname, context.minimum_version) == (
        ssl.CERT_REQUIRED, True, ssl.TLSVersion.TLSv1_2)
    off = client_context(TlsSettings(verify=False), "inventory")
    assert (off.verify_mode, off.check_hostname, off.minimum_version) == (
        ssl.CERT_NONE, False, ssl.TLSVersion.TLSv1_2)


async def test_mutual_tls_with_the_configured_client_certificate(ca, tmp_path):
    cert, key = write_client_cert(ca, tmp_path / "client")
    async with TlsUpstream(ca, require_client_cert=True) as upstream:
        tls = TlsSettings(ca_file=upstream.write_ca(tmp_path / "ca.pem"), client_cert=cert, client_key=key)
        assert await get(upstream.port, client_context(tls, "payment")) == (200, ITEM)
        assert [r.client_names for r in upstream.requests] == [("circuit-proxy.test",)]


@pytest.mark.parametrize("client", ["none", "another CA's"])
async def test_mutual_tls_without_an_accepted_client_certificate_fails(ca, tmp_path, client):
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    tls = TlsSettings(ca_file=ca_file)
    if client != "none":
        cert, key = write_client_cert(trustme.CA(), tmp_path / "stranger")
        tls = TlsSettings(ca_file=ca_file, client_cert=cert, client_key=key)
    async with TlsUpstream(ca, require_client_cert=True) as upstream:
        # TLS 1.3: the client's handshake completes first and the server's alert arrives on the
        # first read, as an SSLError or a reset, depending on timing.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await get(upstream.port, client_context(tls, "payment"))
        assert upstream.requests == []


def test_a_client_key_and_certificate_in_one_file(ca, tmp_path):
    cert, key = write_client_cert(ca, tmp_path)
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    client_context(TlsSettings(client_cert=both), "payment")  # loads without client_key


def test_unusable_files_are_errors_naming_the_key_path(ca, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsError) as caught:
        client_context(TlsSettings(ca_file=garbage), "payment")
    assert str(caught.value).startswith(f"services.payment.tls.ca_file: cannot load {garbage}: ")
    with pytest.raises(TlsError) as caught:
        client_context(TlsSettings(client_cert=garbage), "payment")
    assert str(caught.value).startswith(f"services.payment.tls.client_cert: cannot load {garbage}: ")


def test_an_encrypted_client_key_is_refused_instead_of_prompting(ca, tmp_path):
    from cryptography.hazmat.primitives import serialization

    cert, key = write_client_cert(ca, tmp_path)
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(TlsError) as caught:
        client_context(TlsSettings(client_cert=cert, client_key=key), "payment")
    assert str(caught.value) == (f"services.payment.tls.client_key: {key} is encrypted; use an "
                                 "unencrypted key file readable only by the proxy")


def test_server_hostname_is_the_host_itself():
    assert [server_hostname(h) for h in ("shop.example", "127.0.0.1", "[::1]", "::1")] == [
        "shop.example", "127.0.0.1", "::1", "::1"]


def test_one_context_per_https_service():
    services = [Service(name="a", upstream="https://h:1", routes=()),
                Service(name="b", upstream="http://h:2", routes=()),
                Service(name="c", upstream="HTTPS://h:3", routes=(), tls=TlsSettings(verify=False))]
    contexts = client_contexts(services)
    assert sorted(contexts) == ["a", "c"]
    assert (contexts["a"].check_hostname, contexts["c"].check_hostname) == (True, False)


async def test_a_loaded_config_with_a_relative_ca_file_reaches_the_upstream(upstream, tmp_path):
    (tmp_path / "config").mkdir()
    upstream.write_ca(tmp_path / "config" / "certs" / "shop-ca.pem")
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(textwrap.dedent(f"""\
        services:
          inventory:
            upstream: {upstream.url}
            tls: {{ca_file: certs/shop-ca.pem, client_cert: null, client_key: null, verify: true}}
    """))
    (service,) = load_settings(path, {}).services
    assert service.tls == TlsSettings(ca_file=tmp_path / "config" / "certs" / "shop-ca.pem")
    assert await get(upstream.port, client_context(service.tls, service.name)) == (200, ITEM)


def test_config_does_not_import_ssl():
    import subprocess
    import sys

    probe = "import sys, proxy.config.load; print('ssl' in sys.modules, 'asyncio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "False False\n", "")
