"""Alerts (§6): a log line per transition and webhooks POSTed in the background, to a real receiver."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.ops.alerts import Alerter, alert_payload
from proxy.core.breaker import State, Transition
from proxy.core.clock import FakeClock
from proxy.config.model import AlertSettings, Webhook
from proxy.ops.logs import JsonFormatter, KeyValueFormatter
from proxy.runtime.metrics import Metrics

AT = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class Receiver:
    """A webhook receiver on loopback that answers with the statuses it is given, then 200."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.answers: list[int] = []
        self.hang = asyncio.Event()
        self.hanging = False
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def _hook(self, request: web.Request) -> web.Response:
        if self.hanging:
            await self.hang.wait()
        self.received.append(await request.json())
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))

    async def wait_for(self, count: int) -> list[dict]:
        for _ in range(500):
            if len(self.received) >= count:
                return self.received
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.received)} of {count} webhook calls arrived")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.server.start_server()
    yield receiver
    receiver.hang.set()
    await receiver.server.close()


def transition(to: State, frm: State = State.CLOSED, reason: str = "consecutive_failures") -> Transition:
    return Transition("payment.charges", frm, to, AT, reason)


def deliveries(metrics: Metrics, result: str) -> float | None:
    return metrics.registry.get_sample_value("circuit_proxy_webhook_deliveries_total", {"result": result})


async def started(alerter: Alerter) -> Alerter:
    await alerter.start()
    return alerter


def test_payload_has_the_contract_fields_and_what_slack_and_alertmanager_read():
    payload = alert_payload(transition(State.OPEN))
    assert {k: payload[k] for k in ("breaker", "from_state", "to_state", "at")} == {
        "breaker": "payment.charges", "from_state": "closed", "to_state": "open",
        "at": "2023-11-14T22:13:20.000Z"}
    assert payload["text"] == ("circuit-proxy: breaker payment.charges opened "
                               "(closed → open, consecutive_failures)")
    assert payload["status"] == "firing"
    assert payload["alerts"] == [{
        "status": "firing",
        "labels": {"alertname": "CircuitBreakerOpen", "breaker": "payment.charges", "service": "payment",
                   "route": "charges", "severity": "warning"},
        "annotations": {"summary": payload["text"]},
        "startsAt": "2023-11-14T22:13:20.000Z", "endsAt": None}]
    closed = alert_payload(transition(State.CLOSED, State.HALF_OPEN, "success_threshold"))
    assert (closed["status"], closed["alerts"][0]["endsAt"]) == ("resolved", "2023-11-14T22:13:20.000Z")


async def test_webhooks_get_the_events_they_subscribed_to(receiver):
    metrics = Metrics()
    hooks = (Webhook(url=receiver.url, events=frozenset({"open", "close"})),
             Webhook(url=receiver.url + "?closes-only", events=frozenset({"close"})))
    alerter = await started(Alerter(AlertSettings(webhooks=hooks), metrics))
    try:
        alerter.on_transition(transition(State.OPEN))
        alerter.on_transition(transition(State.HALF_OPEN, State.OPEN, "open_timeout_elapsed"))
        alerter.on_transition(transition(State.CLOSED, State.HALF_OPEN, "success_threshold"))
        received = await receiver.wait_for(3)
    finally:
        await alerter.stop()
    assert sorted((p["from_state"], p["to_state"]) for p in received) == [
        ("closed", "open"), ("half_open", "closed"), ("half_open", "closed")]


async def test_failed_deliveries_are_retried_with_backoff(receiver):
    metrics = Metrics()
    receiver.answers = [503, 502]
    alerter = await started(Alerter(AlertSettings(webhooks=(Webhook(url=receiver.url),)), metrics,
                                    backoff_s=0.01))
    try:
        alerter.on_transition(transition(State.OPEN))
        received = await receiver.wait_for(3)
    finally:
        await alerter.stop()
    assert [p["to_state"] for p in received] == ["open"] * 3
    assert deliveries(metrics, "delivered") == 1


async def test_a_client_error_is_not_retried(receiver):
    metrics = Metrics()
    receiver.answers = [400]
    alerter = await started(Alerter(AlertSettings(webhooks=(Webhook(url=receiver.url),)), metrics,
                                    backoff_s=0.01))
    try:
        alerter.on_transition(transition(State.OPEN))
        alerter.on_transition(transition(State.CLOSED, State.HALF_OPEN, "success_threshold"))
        received = await receiver.wait_for(2)
    finally:
        await alerter.stop()
    assert [p["to_state"] for p in received] == ["open", "closed"]


async def test_a_hanging_receiver_never_blocks_and_a_full_queue_drops(receiver):
    metrics = Metrics()
    receiver.hanging = True
    alerter = await started(Alerter(AlertSettings(webhooks=(Webhook(url=receiver.url),)), metrics,
                                    queue_size=2))
    try:
        for _ in range(5):  # synchronous, no awaiting: the worker has not taken any yet
            alerter.on_transition(transition(State.OPEN))
        assert deliveries(metrics, "dropped") == 3
    finally:
        await asyncio.wait_for(alerter.stop(), 5)


async def test_restored_states_are_not_alerted_again(receiver):
    alerter = await started(Alerter(AlertSettings(webhooks=(Webhook(url=receiver.url),)), Metrics()))
    try:
        alerter.on_transition(transition(State.OPEN, reason="restored"))
        alerter.on_transition(transition(State.CLOSED, State.OPEN, "reset"))
        received = await receiver.wait_for(1)  # in order: a restored alert would be first
    finally:
        await alerter.stop()
    assert [p["reason"] for p in received] == ["reset"]


CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, success_threshold: 1, open_timeout_ms: 1000}
alerts:
  webhooks: [{url: "$hook", events: [open, close]}]
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""


async def test_opening_warns_closing_informs_and_the_webhook_hears_both(start_proxy, fakes, receiver, caplog):
    caplog.set_level(logging.INFO, logger="proxy.ops.alerts")
    clock = FakeClock(start_wall=AT)
    proxy = await start_proxy(CONFIG, clock=clock, hook=receiver.url)
    await fakes.set_mode("payment", "error", status=500)
    for _ in range(2):
        async with proxy.session.post(proxy.url("/payment/charges"), json={}) as response:
            assert response.status == 500
    await fakes.set_mode("payment", "healthy")
    clock.advance(1)
    async with proxy.session.post(proxy.url("/payment/charges"),
                                  json={"amount": 1, "currency": "EUR", "order_id": "o"}) as response:
        assert response.status == 201
    received = await receiver.wait_for(2)
    assert [(p["breaker"], p["from_state"], p["to_state"], p["at"]) for p in received] == [
        ("payment.charges", "closed", "open", "2023-11-14T22:13:20.000Z"),
        ("payment.charges", "half_open", "closed", "2023-11-14T22:13:21.000Z")]
    formatter = KeyValueFormatter()
    lines = [(r.levelname, formatter.format(r)) for r in caplog.records if r.name == "proxy.ops.alerts"]
    assert [(level, "breaker=payment.charges" in line, line.split("to_state=")[1].split()[0])
            for level, line in lines] == [
        ("WARNING", True, "open"), ("INFO", True, "half_open"), ("INFO", True, "closed")]


def test_a_transition_is_one_line_in_either_log_format(caplog):
    caplog.set_level(logging.INFO, logger="proxy.ops.alerts")
    alerter = Alerter(AlertSettings(), Metrics())
    alerter.on_transition(transition(State.OPEN))
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert KeyValueFormatter().format(record).endswith(
        "WARNING proxy.ops.alerts: breaker opened breaker=payment.charges from_state=closed to_state=open "
        "reason=consecutive_failures")
    document = json.loads(JsonFormatter().format(record))
    assert {k: document[k] for k in ("level", "message", "breaker", "from_state", "to_state")} == {
        "level": "WARNING", "message": "breaker opened", "breaker": "payment.charges",
        "from_state": "closed", "to_state": "open"}
