"""fake_upstreams.control and .server: the control API and every mode, on real sockets.

Outcomes only, never durations: a slow mode is checked by its answer, a hang by a client
timeout, flap by seeing both outcomes within a bounded number of polls.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest

from fake_upstreams import (
    SERVICE_NAMES,
    FakeUpstreams,
    ModeError,
    ModeSpec,
    UnknownServiceError,
)

CHARGE = {"amount": 10, "currency": "USD", "order_id": "o-1"}




async def put_mode(http: aiohttp.ClientSession, fakes: FakeUpstreams, name: str, body: Any) -> tuple[int, Any]:
    async with http.put(f"{fakes.control_url}/services/{name}/mode", json=body) as response:
        return response.status, await response.json()


async def charge(http: aiohttp.ClientSession, fakes: FakeUpstreams, **kwargs: Any) -> tuple[int, Any]:
    async with http.post(f"{fakes.url('payment')}/charges", json=CHARGE, **kwargs) as response:
        return response.status, await response.json()


# -- control API ------------------------------------------------------------------


async def test_services_lists_every_service_with_mode_port_and_requests(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{fakes.control_url}/services") as response:
        assert response.status == 200
        services = await response.json()
    assert list(services) == list(SERVICE_NAMES)
    for name in SERVICE_NAMES:
        assert services[name] == {
            "mode": "healthy",
            "port": fakes.port(name),
            "url": fakes.url(name),
            "requests": 0,
            "recorded": 0,
            "listening": True,
        }
    assert len({fakes.control_url, *(fakes.url(n) for n in SERVICE_NAMES)}) == 5


async def test_put_mode_answers_the_service_entry_with_its_options(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    status, entry = await put_mode(http, fakes, "payment", {"mode": "error", "status": 503, "rate": 0.5})
    assert status == 200
    assert entry == {
        "mode": "error", "status": 503, "rate": 0.5, "port": fakes.port("payment"),
        "url": fakes.url("payment"), "requests": 0, "recorded": 0, "listening": True,
    }
    async with http.get(f"{fakes.control_url}/services/payment") as response:
        assert await response.json() == entry


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mode": "error", "status": 600}, "status must be an integer from 400 to 599, got 600"),
        ({"mode": "wobbly"}, "unknown mode 'wobbly': expected one of healthy, error, slow, hang, down, flap"),
        ({"status": 500}, "mode is required: one of healthy, error, slow, hang, down, flap"),
        ({"mode": "slow", "rate": 1}, "mode 'slow' takes no option 'rate' (it takes latency_ms)"),
        ("error", 'body must be a JSON object such as {"mode": "error", "status": 503}'),
    ],
)
async def test_invalid_mode_is_400_and_changes_nothing(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    assert await put_mode(http, fakes, "payment", body) == (
        400, {"error": "invalid_mode", "message": message, "problems": [message]},
    )
    assert fakes.mode("payment") == ModeSpec()


async def test_mode_body_that_is_not_json_is_400(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    async with http.put(f"{fakes.control_url}/services/payment/mode", data=b"mode=down") as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"] == "invalid_mode"
    assert body["message"].startswith("body is not valid JSON: ")


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/services/billing/mode"), ("POST", "/services/billing/reset"), ("GET", "/services/billing")],
)
async def test_unknown_service_is_404(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, f"{fakes.control_url}{path}", json={"mode": "down"}) as response:
        assert response.status == 404
        assert await response.json() == {
            "error": "unknown_service",
            "message": "unknown service 'billing': expected one of payment, inventory, notification, shipping",
            "service": "billing",
        }


async def test_reset_clears_records_and_count_and_heals(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    await charge(http, fakes)
    await put_mode(http, fakes, "payment", {"mode": "error"})
    async with http.post(f"{fakes.control_url}/services/payment/reset") as response:
        assert response.status == 200
        entry = await response.json()
    assert (entry["mode"], entry["requests"], entry["recorded"]) == ("healthy", 0, 0)
    assert fakes.service("payment").records == []
    assert (await charge(http, fakes))[0] == 201


async def test_records_of_a_service(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    _, created = await charge(http, fakes)
    async with http.get(f"{fakes.control_url}/services/payment/records") as response:
        assert await response.json() == [created]


async def test_page_is_self_contained_html(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{fakes.control_url}/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert "fetch(" in page and "/mode" in page and "/reset" in page
    assert "<script src" not in page and "<link" not in page  # no CDN, nothing external
    assert "innerHTML" not in page  # shown values go in with textContent


async def test_programmatic_api_validates_like_the_control_api(fakes: FakeUpstreams) -> None:
    with pytest.raises(ModeError, match="status must be an integer from 400 to 599, got 99"):
        await fakes.set_mode("payment", "error", status=99)
    with pytest.raises(UnknownServiceError):
        await fakes.set_mode("billing", "down")
    with pytest.raises(KeyError):
        fakes.requests("billing")
    entry = await fakes.set_mode("shipping", "slow", latency_ms=5)
    assert (entry["mode"], entry["latency_ms"]) == ("slow", 5.0)


# -- modes ------------------------------------------------------------------------


async def test_error_mode_answers_the_status_and_records_nothing(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    await fakes.set_mode("payment", "error", status=503)
    for _ in range(3):
        assert await charge(http, fakes) == (
            503,
            {"error": "injected_failure", "message": "payment is in mode error", "service": "payment", "status": 503},
        )
    assert fakes.requests("payment") == 3
    assert fakes.service("payment").records == []


async def test_error_rate_fails_its_share_deterministically(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    await put_mode(http, fakes, "payment", {"mode": "error", "status": 502, "rate": 0.5})
    statuses = [(await charge(http, fakes))[0] for _ in range(6)]
    assert statuses == [502, 201, 502, 201, 502, 201]
    assert len(fakes.service("payment").records) == 3


async def test_slow_mode_still_answers(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    await put_mode(http, fakes, "payment", {"mode": "slow", "latency_ms": 20})
    status, created = await charge(http, fakes)
    assert (status, created["id"]) == (201, "ch_1")


async def test_slow_mode_outlasts_a_shorter_client_timeout(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    await fakes.set_mode("payment", "slow", latency_ms=2000)
    with pytest.raises(asyncio.TimeoutError):
        await charge(http, fakes, timeout=aiohttp.ClientTimeout(total=0.1))
    assert fakes.requests("payment") == 1


async def test_slow_request_is_still_served_after_the_client_gave_up(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    # As with a real slow upstream: a client timeout does not mean nothing happened.
    await fakes.set_mode("payment", "slow", latency_ms=200)
    with pytest.raises(asyncio.TimeoutError):
        await charge(http, fakes, headers={"Idempotency-Key": "late"}, timeout=aiohttp.ClientTimeout(total=0.05))
    await wait_for_records(fakes, "payment", 1)
    await fakes.set_mode("payment", "healthy")
    status, again = await charge(http, fakes, headers={"Idempotency-Key": "late"})
    assert (status, again) == (200, fakes.service("payment").records[0])


async def test_reset_cancels_slow_work(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    await fakes.set_mode("payment", "slow", latency_ms=10_000)
    in_flight = asyncio.create_task(charge(http, fakes))
    await wait_for_requests(fakes, "payment", 1)
    await fakes.reset("payment")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await in_flight
    assert (fakes.requests("payment"), fakes.service("payment").records) == (0, [])


async def test_hang_never_answers_and_counts_the_request(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    await put_mode(http, fakes, "payment", {"mode": "hang"})
    with pytest.raises(asyncio.TimeoutError):
        await charge(http, fakes, timeout=aiohttp.ClientTimeout(total=0.2))
    assert fakes.requests("payment") == 1
    assert fakes.service("payment").records == []
    await put_mode(http, fakes, "payment", {"mode": "healthy"})
    assert (await charge(http, fakes))[0] == 201


async def test_leaving_hang_drops_hung_requests_unanswered(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    await fakes.set_mode("payment", "hang")
    hung = asyncio.create_task(charge(http, fakes))
    await wait_for_requests(fakes, "payment", 1)
    await fakes.set_mode("payment", "healthy")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await hung
    assert fakes.service("payment").records == []  # the hung charge was never made


async def test_stop_ends_hung_requests(http: aiohttp.ClientSession) -> None:
    fakes = FakeUpstreams(host="127.0.0.1", base_port=0)
    await fakes.start()
    try:
        await fakes.set_mode("payment", "hang")
        hung = asyncio.create_task(charge(http, fakes))
        await wait_for_requests(fakes, "payment", 1)
    finally:
        await asyncio.wait_for(fakes.stop(), timeout=5)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await hung


async def test_down_refuses_connections_and_comes_back_on_the_same_port(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    port = fakes.port("payment")
    assert (await charge(http, fakes))[0] == 201  # leaves a keep-alive connection in `http`
    status, entry = await put_mode(http, fakes, "payment", {"mode": "down"})
    assert (status, entry["mode"], entry["listening"]) == (200, "down", False)
    with pytest.raises(aiohttp.ClientConnectionError):
        await charge(http, fakes)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await put_mode(http, fakes, "payment", {"mode": "healthy"})
    assert fakes.port("payment") == port
    assert (await charge(http, fakes))[0] == 201


async def test_down_closes_open_keep_alive_connections(fakes: FakeUpstreams) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fakes.port("payment"))
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: fake\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        ))
        await reader.readexactly(length)
        await fakes.set_mode("payment", "down")
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # closed by the server
    finally:
        writer.close()
        await writer.wait_closed()


async def test_down_cuts_requests_in_flight(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    await fakes.set_mode("payment", "slow", latency_ms=10_000)
    in_flight = asyncio.create_task(charge(http, fakes))
    await wait_for_requests(fakes, "payment", 1)
    await fakes.set_mode("payment", "down")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await in_flight
    assert fakes.service("payment").records == []


async def test_flap_alternates_healthy_and_error(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    await put_mode(http, fakes, "shipping", {"mode": "flap", "period_s": 0.2, "status": 503})
    url = f"{fakes.url('shipping')}/healthz"
    runs: list[int] = []  # statuses seen, consecutive repeats folded
    for _ in range(150):  # 150 polls ≥ 20 ms apart: at least 3 s, many periods of 0.2 s
        async with http.get(url) as response:
            if not runs or runs[-1] != response.status:
                runs.append(response.status)
        if len(runs) >= 3:
            break
        await asyncio.sleep(0.02)
    # healthy and error alternate, whichever the poll happened to start in
    assert runs in ([200, 503, 200], [503, 200, 503])


async def wait_for_requests(fakes: FakeUpstreams, name: str, count: int) -> None:
    """Until `count` requests reached `name` (bounded: 2 s)."""
    for _ in range(200):
        if fakes.requests(name) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} got {fakes.requests(name)} requests, not {count}")


async def wait_for_records(fakes: FakeUpstreams, name: str, count: int) -> None:
    """Until `name` holds `count` records (bounded: 2 s)."""
    for _ in range(200):
        if len(fakes.service(name).records) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} holds {len(fakes.service(name).records)} records, not {count}")


# -- life cycle -------------------------------------------------------------------


async def test_start_on_a_taken_port_raises_and_frees_the_others() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fakes = FakeUpstreams(host="127.0.0.1", base_port=port)
        with pytest.raises(OSError):
            await fakes.start()
    await fakes.stop()  # safe to repeat


async def test_stop_frees_every_port() -> None:
    async with FakeUpstreams(host="127.0.0.1", base_port=0) as fakes:
        ports = [fakes.control_port, *(fakes.port(n) for n in SERVICE_NAMES)]
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_port_taken_while_down_is_a_500_that_says_so(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    await fakes.set_mode("payment", "down")
    port = fakes.port("payment")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        status, body = await put_mode(http, fakes, "payment", {"mode": "healthy"})
    assert (status, body["error"]) == (500, "cannot_listen")
    assert body["message"].startswith(f"payment: cannot listen on port {port} again: ")
    await fakes.set_mode("payment", "healthy")  # the port is free again
    assert (await charge(http, fakes))[0] == 201
