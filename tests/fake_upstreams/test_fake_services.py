"""fake_upstreams.services: the four shop APIs, through real servers on loopback port 0."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from fake_upstreams import SERVICE_NAMES, SKUS, FakeUpstreams


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    async with http.request(method, url, json=body, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


# -- payment ----------------------------------------------------------------------


async def test_charge_is_created_and_listed(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    url = fakes.url("payment")
    status, charge = await call(http, "POST", f"{url}/charges", {"amount": 42.5, "currency": "EUR", "order_id": "o-1"})
    assert (status, charge) == (
        201,
        {"id": "ch_1", "amount": 42.5, "currency": "EUR", "order_id": "o-1", "idempotency_key": None},
    )
    assert await call(http, "GET", f"{url}/charges/ch_1") == (200, charge)
    assert await call(http, "GET", f"{url}/charges") == (200, [charge])
    assert fakes.service("payment").records == [charge]


async def test_same_idempotency_key_returns_the_same_charge_once(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    url = f"{fakes.url('payment')}/charges"
    body = {"amount": 10, "currency": "USD", "order_id": "o-7"}
    status, first = await call(http, "POST", url, body, key="key-1")
    assert status == 201
    assert first["idempotency_key"] == "key-1"
    async with http.post(url, json=body, headers={"Idempotency-Key": "key-1"}) as again:
        assert again.status == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await again.json() == first
    status, other = await call(http, "POST", url, body, key="key-2")
    assert (status, other["id"]) == (201, "ch_2")
    assert [c["id"] for c in fakes.service("payment").records] == ["ch_1", "ch_2"]


async def test_charges_without_a_key_are_each_new(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    url = f"{fakes.url('payment')}/charges"
    for amount in (1, 2, 3):
        await call(http, "POST", url, {"amount": amount})
    status, charges = await call(http, "GET", url)
    assert status == 200
    assert [(c["id"], c["amount"], c["currency"]) for c in charges] == [
        ("ch_1", 1, "USD"), ("ch_2", 2, "USD"), ("ch_3", 3, "USD"),
    ]


async def test_unknown_charge_is_404(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    assert await call(http, "GET", f"{fakes.url('payment')}/charges/ch_9") == (
        404, {"error": "not_found", "message": "no payment record with id 'ch_9'"},
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"currency": "USD"}, "amount is required and must be a positive number, got None"),
        ({"amount": "10"}, "amount is required and must be a positive number, got '10'"),
        ({"amount": True}, "amount is required and must be a positive number, got True"),
        ({"amount": -5}, "amount is required and must be a positive number, got -5"),
        ({"amount": 5, "currency": 3}, "currency must be a non-empty string, got 3"),
        ([1, 2], "body must be a JSON object"),
    ],
)
async def test_invalid_charge_is_400(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    url = f"{fakes.url('payment')}/charges"
    assert await call(http, "POST", url, body) == (400, {"error": "invalid_request", "message": message})
    assert fakes.service("payment").records == []


async def test_body_that_is_not_json_is_400(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{fakes.url('payment')}/charges", data=b"{amount:") as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"] == "invalid_request"
    assert body["message"].startswith("body is not valid JSON: ")


# -- inventory --------------------------------------------------------------------


@pytest.mark.parametrize(("sku", "available"), [("SKU-001", 17), ("SKU-003", 1), ("SKU-050", 0), ("SKU-100", 0)])
async def test_stock_of_known_skus(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, sku: str, available: int
) -> None:
    assert await call(http, "GET", f"{fakes.url('inventory')}/stock/{sku}") == (
        200, {"sku": sku, "available": available},
    )


@pytest.mark.parametrize("sku", ["SKU-000", "SKU-101", "SKU-1", "sku-001", "BANANA"])
async def test_stock_of_unknown_sku_is_404(fakes: FakeUpstreams, http: aiohttp.ClientSession, sku: str) -> None:
    assert await call(http, "GET", f"{fakes.url('inventory')}/stock/{sku}") == (
        404, {"error": "unknown_sku", "message": f"unknown sku {sku!r}", "sku": sku},
    )


async def test_stock_list_has_every_sku(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    status, stock = await call(http, "GET", f"{fakes.url('inventory')}/stock")
    assert status == 200
    assert [item["sku"] for item in stock] == list(SKUS)
    assert len(SKUS) == 100


async def test_reservation_takes_from_stock_until_it_runs_out(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    url = fakes.url("inventory")
    status, reservation = await call(http, "POST", f"{url}/reservations", {"sku": "SKU-001", "quantity": 10})
    assert (status, reservation) == (
        201, {"id": "res_1", "sku": "SKU-001", "quantity": 10, "idempotency_key": None},
    )
    assert await call(http, "GET", f"{url}/stock/SKU-001") == (200, {"sku": "SKU-001", "available": 7})
    assert await call(http, "POST", f"{url}/reservations", {"sku": "SKU-001", "quantity": 8}) == (
        409,
        {
            "error": "insufficient_stock",
            "message": "SKU-001: 8 requested, 7 available",
            "sku": "SKU-001",
            "available": 7,
            "requested": 8,
        },
    )
    assert await call(http, "GET", f"{url}/reservations") == (200, [reservation])


async def test_reservation_replay_with_same_key_reserves_once(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    url = fakes.url("inventory")
    body = {"sku": "SKU-002", "quantity": 4}  # 34 available
    first = await call(http, "POST", f"{url}/reservations", body, key="r-1")
    again = await call(http, "POST", f"{url}/reservations", body, key="r-1")
    assert (first[0], again[0], again[1]) == (201, 200, first[1])
    assert await call(http, "GET", f"{url}/stock/SKU-002") == (200, {"sku": "SKU-002", "available": 30})


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"sku": "SKU-404", "quantity": 1}, 404, "unknown_sku"),
        ({"sku": "SKU-001", "quantity": 0}, 400, "invalid_request"),
        ({"sku": "SKU-001", "quantity": 1.5}, 400, "invalid_request"),
        ({"quantity": 1}, 400, "invalid_request"),
    ],
)
async def test_invalid_reservation(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, body: Any, status: int, error: str
) -> None:
    got_status, got = await call(http, "POST", f"{fakes.url('inventory')}/reservations", body)
    assert (got_status, got["error"]) == (status, error)
    assert fakes.service("inventory").records == []


# -- notification -----------------------------------------------------------------


async def test_notifications_are_accepted_and_listed_in_order(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    url = f"{fakes.url('notification')}/notifications"
    sent = []
    for n in (1, 2):
        body = {"to": f"user{n}@example.com", "template": "order_shipped", "data": {"order": n}}
        status, notification = await call(http, "POST", url, body, key=f"n-{n}")
        assert status == 202
        sent.append(notification)
    assert sent[0] == {
        "id": "ntf_1",
        "to": "user1@example.com",
        "template": "order_shipped",
        "data": {"order": 1},
        "idempotency_key": "n-1",
    }
    assert await call(http, "GET", url) == (200, sent)
    assert await call(http, "GET", f"{url}/ntf_2") == (200, sent[1])


async def test_notification_resent_with_same_key_is_recorded_once(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    url = f"{fakes.url('notification')}/notifications"
    body = {"to": "a@example.com", "template": "receipt", "data": {}}
    first = await call(http, "POST", url, body, key="once")
    again = await call(http, "POST", url, body, key="once")
    assert first == again
    assert first[0] == 202
    assert fakes.service("notification").records == [first[1]]


async def test_notification_data_defaults_to_empty_object(
    fakes: FakeUpstreams, http: aiohttp.ClientSession
) -> None:
    status, notification = await call(
        http, "POST", f"{fakes.url('notification')}/notifications", {"to": "a@b.c", "template": "t"}
    )
    assert (status, notification["data"]) == (202, {})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"template": "t"}, "to is required and must be a non-empty string, got None"),
        ({"to": "a@b.c", "template": ""}, "template is required and must be a non-empty string, got ''"),
        ({"to": "a@b.c", "template": "t", "data": [1]}, "data must be a JSON object, got [1]"),
    ],
)
async def test_invalid_notification_is_400(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    url = f"{fakes.url('notification')}/notifications"
    assert await call(http, "POST", url, body) == (400, {"error": "invalid_request", "message": message})


# -- shipping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "weight", "quote"),
    [
        ("US", 2.5, {"carrier": "UPS Ground", "cost": 8.0, "currency": "USD", "eta_days": 3}),
        ("ca", 1, {"carrier": "FedEx International", "cost": 14.5, "currency": "USD", "eta_days": 5}),
        ("DE", 0.3, {"carrier": "DHL Express", "cost": 19.05, "currency": "USD", "eta_days": 6}),
        ("JP", 10, {"carrier": "DHL Worldwide", "cost": 75.0, "currency": "USD", "eta_days": 9}),
    ],
)
async def test_quote_is_deterministic_by_zone_and_weight(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, country: str, weight: float, quote: dict[str, Any]
) -> None:
    body = {"destination": {"country": country, "postcode": "12345"}, "weight_kg": weight}
    url = f"{fakes.url('shipping')}/quotes"
    assert await call(http, "POST", url, body) == (200, quote)
    assert await call(http, "POST", url, body) == (200, quote)
    assert [r["id"] for r in fakes.service("shipping").records] == ["q_1", "q_2"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"weight_kg": 1}, 'destination is required: {"country": "US", "postcode": "10001"}'),
        (
            {"destination": {"country": "USA", "postcode": "1"}, "weight_kg": 1},
            "destination.country must be a 2-letter country code, got 'USA'",
        ),
        ({"destination": {"country": "US"}, "weight_kg": 1}, "destination.postcode is required, got None"),
        (
            {"destination": {"country": "US", "postcode": "1"}, "weight_kg": 0},
            "weight_kg must be a number above 0, at most 1000, got 0",
        ),
    ],
)
async def test_invalid_quote_is_400(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    url = f"{fakes.url('shipping')}/quotes"
    assert await call(http, "POST", url, body) == (400, {"error": "invalid_request", "message": message})


# -- every service ----------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICE_NAMES)
async def test_unknown_path_and_wrong_method_answer_json(
    fakes: FakeUpstreams, http: aiohttp.ClientSession, name: str
) -> None:
    url = fakes.url(name)
    assert await call(http, "GET", f"{url}/nope") == (
        404, {"error": "not_found", "message": "Not Found: GET /nope"},
    )
    assert await call(http, "DELETE", f"{url}/healthz") == (
        405, {"error": "method_not_allowed", "message": "Method Not Allowed: DELETE /healthz"},
    )
    assert await call(http, "GET", f"{url}/healthz") == (200, {"status": "ok", "service": name})
    assert fakes.requests(name) == 3  # every request that reached it, 404 and 405 too


async def test_reset_forgets_records_count_and_stock(fakes: FakeUpstreams, http: aiohttp.ClientSession) -> None:
    inventory = fakes.url("inventory")
    await call(http, "POST", f"{inventory}/reservations", {"sku": "SKU-001", "quantity": 17})
    await call(http, "POST", f"{fakes.url('payment')}/charges", {"amount": 1}, key="k")
    await fakes.reset("inventory")
    assert (fakes.requests("inventory"), fakes.service("inventory").records) == (0, [])
    assert await call(http, "GET", f"{inventory}/stock/SKU-001") == (200, {"sku": "SKU-001", "available": 17})
    assert len(fakes.service("payment").records) == 1  # only the named service is reset
    await fakes.reset()
    assert fakes.service("payment").records == []
    status, again = await call(http, "POST", f"{fakes.url('payment')}/charges", {"amount": 1}, key="k")
    assert (status, again["id"]) == (201, "ch_1")  # the key was forgotten too
