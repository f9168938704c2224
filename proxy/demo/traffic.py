"""The demo's shoppers: a checkout mix sent through the proxy at a few requests a second.

Each order is four calls, one per tick: a stock lookup (`GET /inventory/stock/SKU-0xx`), a
shipping quote, a payment charge (with an amount and an `Idempotency-Key`) and an order
confirmation. So the status page moves by itself, and an outage shows what a shop would see.

It can never pile up: one pacer puts a call on a queue as long as the workers can take it,
and skips the tick (counted) when they cannot; a fixed pool of workers sends them with a short
client timeout. Loopback only: it refuses any other address. `stop` ends it at once, calls in
flight included. It uses aiohttp as a client, like any shop would: it is not the data path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from proxy.background import stop_task

log = logging.getLogger(__name__)

DEFAULT_RATE = 4.0  # requests a second
MAX_RATE = 50.0
DEFAULT_WORKERS = 4
DEFAULT_TIMEOUT_S = 5.0  # longer than the shipped routes' timeouts: the shopper sees the proxy's answer
COUNTRIES = ("IT", "DE", "FR", "ES", "GB", "US", "JP")


@dataclass(frozen=True, slots=True)
class Call:
    step: str  # stock | quote | charge | notify
    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class TrafficStats:
    sent: int = 0
    skipped: int = 0  # ticks dropped because every worker was busy (a hang, a slow upstream)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # (step, status) → count
    errors: Counter[str] = field(default_factory=Counter)  # step → timeouts and refused connections

    def summary(self) -> str:
        by_status = Counter[int]()
        for (_, status), count in self.answers.items():
            by_status[status] += count
        statuses = " ".join(f"{status}×{count}" for status, count in sorted(by_status.items()))
        return (f"sent {self.sent}, answers {statuses or 'none'}, client errors {sum(self.errors.values())},"
                f" skipped ticks {self.skipped}")


class Checkout:
    """The endless sequence of calls of the shop's orders (seeded: the same seed, the same shop)."""

    def __init__(self, seed: int | None = None, run_id: str | None = None) -> None:
        self._rng = random.Random(seed)
        # Keys differ from run to run: the proxy's queues remember keys across restarts.
        self._run = run_id or uuid.uuid4().hex[:8]
        self._order = 0
        self._pending: list[Call] = []

    def next_call(self) -> Call:
        if not self._pending:
            self._order += 1
            self._pending = self._order_calls(self._order)
        return self._pending.pop(0)

    def _order_calls(self, n: int) -> list[Call]:
        rng = self._rng
        order_id = f"demo-{self._run}-{n}"
        sku = f"SKU-{rng.randint(1, 99):03d}"
        amount = rng.randint(500, 9500) / 100  # below the shipped floor_limit of 100
        return [
            Call("stock", "GET", f"/inventory/stock/{sku}"),
            Call("quote", "POST", "/shipping/quotes", {
                "destination": {"country": rng.choice(COUNTRIES), "postcode": f"{rng.randint(10000, 99999)}"},
                "weight_kg": rng.randint(1, 40) / 4}),
            Call("charge", "POST", "/payment/charges",
                 {"amount": amount, "currency": "EUR", "order_id": order_id},
                 {"Idempotency-Key": f"{order_id}-charge"}),
            Call("notify", "POST", "/notification/notifications",
                 {"to": f"customer{n}@example.com", "template": "order_confirmed",
                  "data": {"order_id": order_id, "sku": sku, "amount": amount}},
                 {"Idempotency-Key": f"{order_id}-confirmation"}),
        ]


def require_loopback(url: str) -> str:
    """`url` without a trailing slash, or ValueError unless it is http on a loopback address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise ValueError(f"demo traffic goes to a loopback http address only, got {url!r}")
    return url.rstrip("/")


class Traffic:
    """The checkout mix at `rate` requests a second through the proxy at `base_url`."""

    def __init__(self, base_url: str, *, rate: float = DEFAULT_RATE, workers: int = DEFAULT_WORKERS,
                 timeout_s: float = DEFAULT_TIMEOUT_S, seed: int | None = None) -> None:
        self.base_url = require_loopback(base_url)
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be above 0 and at most {MAX_RATE:g} requests a second, got {rate}")
        if not 1 <= workers <= 16:
            raise ValueError(f"workers must be from 1 to 16, got {workers}")
        self.rate = rate
        self.workers = workers
        self.timeout_s = timeout_s
        self.stats = TrafficStats()
        self.in_flight = 0
        self.most_in_flight = 0
        self._checkout = Checkout(seed)
        self._calls: asyncio.Queue[Call] = asyncio.Queue(maxsize=workers)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def is_running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        if self._tasks:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.workers),
            headers={"User-Agent": "circuit-proxy-demo-shop"})
        self._tasks = [asyncio.create_task(self._pace(), name="demo-traffic-pacer")]
        self._tasks += [asyncio.create_task(self._work(), name=f"demo-traffic-{n}") for n in range(self.workers)]
        log.info("demo traffic: %g requests a second through %s (--no-traffic turns it off)",
                 self.rate, self.base_url)

    async def stop(self) -> None:
        """End every task and call in flight; close the client's connections."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await stop_task(task)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if tasks:
            log.info("demo traffic stopped: %s", self.stats.summary())

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1 / self.rate
        next_at = loop.time()
        while True:
            try:
                self._calls.put_nowait(self._checkout.next_call())
            except asyncio.QueueFull:
                self.stats.skipped += 1  # never a backlog: the shopper gave up on this one
            next_at = max(next_at + interval, loop.time() - interval)  # no burst after a stall
            await asyncio.sleep(next_at - loop.time())

    async def _work(self) -> None:
        while True:
            call = await self._calls.get()
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await self._send(call)
            finally:
                self.in_flight -= 1

    async def _send(self, call: Call) -> None:
        assert self._session is not None
        self.stats.sent += 1
        try:
            async with self._session.request(call.method, self.base_url + call.path, json=call.body,
                                             headers=call.headers) as response:
                await response.read()
                self.stats.answers[(call.step, response.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.errors[call.step] += 1
            log.debug("demo traffic: %s %s: %s", call.method, call.path, exc or type(exc).__name__)
