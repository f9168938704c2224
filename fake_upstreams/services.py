"""The four shop services of §7: their HTTP APIs and in-memory records.

Only what a healthy upstream does lives here; failure modes and listeners are in
`server.py`. Handlers never await between looking up an Idempotency-Key and storing
the new record, so concurrent retries of one request cannot create two records.
Every answer, errors included, is JSON.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, ClassVar, Final

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Record = dict[str, Any]

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"  # as Stripe names it


class ApiError(Exception):
    """A client mistake, answered as `status` with `{"error": code, "message": ...}`."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": code, "message": message, **extra}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status)


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer ApiError and aiohttp's own 404/405 with a JSON body."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        message = f"{exc.reason}: {request.method} {request.path}"
        return web.json_response({"error": code, "message": message}, status=exc.status)


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 ApiError saying what is wrong with it."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("body must be a JSON object")
    return body


def idempotency_key(request: web.Request) -> str | None:
    return request.headers.get(IDEMPOTENCY_HEADER, "").strip() or None


def is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def require_text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"{key} is required and must be a non-empty string, got {value!r}")
    return value


def replay(record: Record, status: int) -> web.Response:
    """The answer to a retry of a request already served: the same record, once."""
    return web.json_response(record, status=status, headers={REPLAYED_HEADER: "true"})


class Service:
    """One shop service: its routes, its records in arrival order, its request count."""

    name: ClassVar[str]
    id_prefix: ClassVar[str]

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.requests = 0  # counted by the server for every request that reached it
        self._by_key: dict[str, Record] = {}

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/healthz", self.healthz)]

    def reset(self) -> None:
        """Forget every record and the request count (the list object is kept)."""
        self.records.clear()
        self.requests = 0
        self._by_key.clear()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": self.name})

    def _next_id(self) -> str:
        return f"{self.id_prefix}_{len(self.records) + 1}"

    def _store(self, record: Record, key: str | None) -> Record:
        self.records.append(record)
        if key is not None:
            self._by_key[key] = record
        return record

    def _find(self, record_id: str) -> Record:
        for record in self.records:
            if record.get("id") == record_id:
                return record
        raise ApiError(404, "not_found", f"no {self.name} record with id {record_id!r}")


class Payment(Service):
    """Charges; an Idempotency-Key seen before returns its charge, never a second one."""

    name = "payment"
    id_prefix = "ch"

    def routes(self) -> list[web.RouteDef]:
        return super().routes() + [
            web.post("/charges", self.create_charge),
            web.get("/charges", self.list_charges),
            web.get("/charges/{id}", self.get_charge),
        ]

    async def create_charge(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        key = idempotency_key(request)
        if key is not None and key in self._by_key:
            return replay(self._by_key[key], 200)
        amount = body.get("amount")
        if not is_number(amount) or amount <= 0:
            raise invalid(f"amount is required and must be a positive number, got {amount!r}")
        currency = body.get("currency", "USD")
        if not isinstance(currency, str) or not currency:
            raise invalid(f"currency must be a non-empty string, got {currency!r}")
        order_id = body.get("order_id")
        if order_id is not None and not isinstance(order_id, (str, int)):
            raise invalid(f"order_id must be a string, got {order_id!r}")
        charge = {
            "id": self._next_id(),
            "amount": amount,
            "currency": currency,
            "order_id": order_id,
            "idempotency_key": key,
        }
        log.debug("payment: charge %s amount=%s", charge["id"], amount)
        return web.json_response(self._store(charge, key), status=201)

    async def list_charges(self, request: web.Request) -> web.Response:
        return web.json_response(self.records)

    async def get_charge(self, request: web.Request) -> web.Response:
        return web.json_response(self._find(request.match_info["id"]))


SKUS: Final = tuple(f"SKU-{n:03d}" for n in range(1, 101))


def initial_stock(sku: str) -> int:
    """Deterministic availability from the sku's number: SKU-050 and SKU-100 are out."""
    return int(sku[4:]) * 17 % 50


class Inventory(Service):
    """Stock levels of SKU-001 to SKU-100, and reservations that take from them."""

    name = "inventory"
    id_prefix = "res"

    def __init__(self) -> None:
        super().__init__()
        self.available = {sku: initial_stock(sku) for sku in SKUS}

    def reset(self) -> None:
        super().reset()
        self.available = {sku: initial_stock(sku) for sku in SKUS}

    def routes(self) -> list[web.RouteDef]:
        return super().routes() + [
            web.get("/stock", self.list_stock),
            web.get("/stock/{sku}", self.get_stock),
            web.post("/reservations", self.reserve),
            web.get("/reservations", self.list_reservations),
        ]

    def _level(self, sku: str) -> Record:
        if sku not in self.available:
            raise ApiError(404, "unknown_sku", f"unknown sku {sku!r}", sku=sku)
        return {"sku": sku, "available": self.available[sku]}

    async def list_stock(self, request: web.Request) -> web.Response:
        return web.json_response([self._level(sku) for sku in SKUS])

    async def get_stock(self, request: web.Request) -> web.Response:
        return web.json_response(self._level(request.match_info["sku"]))

    async def reserve(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        key = idempotency_key(request)
        if key is not None and key in self._by_key:
            return replay(self._by_key[key], 200)
        sku = require_text(body, "sku")
        quantity = body.get("quantity")
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
            raise invalid(f"quantity is required and must be an integer ≥ 1, got {quantity!r}")
        available = self._level(sku)["available"]
        if quantity > available:
            raise ApiError(
                409, "insufficient_stock", f"{sku}: {quantity} requested, {available} available",
                sku=sku, available=available, requested=quantity,
            )
        self.available[sku] = available - quantity
        reservation = {
            "id": self._next_id(), "sku": sku, "quantity": quantity, "idempotency_key": key,
        }
        return web.json_response(self._store(reservation, key), status=201)

    async def list_reservations(self, request: web.Request) -> web.Response:
        return web.json_response(self.records)


class Notification(Service):
    """Notifications accepted for sending; a retried Idempotency-Key is recorded once."""

    name = "notification"
    id_prefix = "ntf"

    def routes(self) -> list[web.RouteDef]:
        return super().routes() + [
            web.post("/notifications", self.send),
            web.get("/notifications", self.list_notifications),
            web.get("/notifications/{id}", self.get_notification),
        ]

    async def send(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        key = idempotency_key(request)
        if key is not None and key in self._by_key:
            # Still 202: the retry is accepted, it just is not sent twice.
            return replay(self._by_key[key], 202)
        to = require_text(body, "to")
        template = require_text(body, "template")
        data = body.get("data", {})
        if not isinstance(data, dict):
            raise invalid(f"data must be a JSON object, got {data!r}")
        notification = {
            "id": self._next_id(),
            "to": to,
            "template": template,
            "data": data,
            "idempotency_key": key,
        }
        return web.json_response(self._store(notification, key), status=202)

    async def list_notifications(self, request: web.Request) -> web.Response:
        return web.json_response(self.records)

    async def get_notification(self, request: web.Request) -> web.Response:
        return web.json_response(self._find(request.match_info["id"]))


# Shipping zones: (countries, carrier, base cost, cost per kg, eta in days).
DOMESTIC: Final = "US"
ZONES: Final = (
    (frozenset({DOMESTIC}), "UPS Ground", Decimal("5.00"), Decimal("1.20"), 3),
    (frozenset({"CA", "MX"}), "FedEx International", Decimal("12.00"), Decimal("2.50"), 5),
    (
        frozenset("AT BE CH DE DK ES FI FR GB IE IT NL NO PL PT SE".split()),
        "DHL Express", Decimal("18.00"), Decimal("3.50"), 6,
    ),
)
WORLDWIDE: Final = (frozenset[str](), "DHL Worldwide", Decimal("25.00"), Decimal("5.00"), 9)
MAX_WEIGHT_KG: Final = 1000


def quote(country: str, weight_kg: float) -> Record:
    """The deterministic price of a parcel: zone base + per-kg rate, to the cent."""
    _, carrier, base, per_kg, eta_days = next(
        (zone for zone in ZONES if country in zone[0]), WORLDWIDE
    )
    cost = (base + per_kg * Decimal(repr(weight_kg))).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return {"carrier": carrier, "cost": float(cost), "currency": "USD", "eta_days": eta_days}


class Shipping(Service):
    """Shipping quotes; each quote given is recorded with the request it answered."""

    name = "shipping"
    id_prefix = "q"

    def routes(self) -> list[web.RouteDef]:
        return super().routes() + [
            web.post("/quotes", self.create_quote),
            web.get("/quotes", self.list_quotes),
        ]

    async def create_quote(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        destination = body.get("destination")
        if not isinstance(destination, dict):
            raise invalid("destination is required: {\"country\": \"US\", \"postcode\": \"10001\"}")
        country = destination.get("country")
        if not isinstance(country, str) or len(country) != 2 or not country.isalpha():
            raise invalid(f"destination.country must be a 2-letter country code, got {country!r}")
        postcode = destination.get("postcode")
        if not isinstance(postcode, str) or not postcode.strip():
            raise invalid(f"destination.postcode is required, got {postcode!r}")
        weight = body.get("weight_kg")
        if not is_number(weight) or not 0 < weight <= MAX_WEIGHT_KG:
            raise invalid(
                f"weight_kg must be a number above 0, at most {MAX_WEIGHT_KG}, got {weight!r}"
            )
        answer = quote(country.upper(), weight)
        record = {"id": self._next_id(), "destination": destination, "weight_kg": weight, **answer}
        self._store(record, None)
        return web.json_response(answer)

    async def list_quotes(self, request: web.Request) -> web.Response:
        return web.json_response(self.records)


SERVICE_CLASSES: Final[tuple[type[Service], ...]] = (Payment, Inventory, Notification, Shipping)
SERVICE_NAMES: Final = tuple(cls.name for cls in SERVICE_CLASSES)
