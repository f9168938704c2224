"""Alerts on breaker transitions (§6): one log line each, and webhooks POSTed in the background.

The transition listener only logs and `put_nowait`s into one bounded queue per webhook; a
worker per webhook delivers in order and retries with backoff, so a slow or dead receiver
delays only its own alerts and never a request. A full queue drops the alert (counted in
`circuit_proxy_webhook_deliveries_total{result="dropped"}` and logged).

Payload: the contract's `{"breaker", "from_state", "to_state", "at"}`, plus `text` for
Slack-style receivers and `status` / `alerts` / `commonLabels` in the shape of an Alertmanager
webhook, so receivers written for either take it as it is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout

from proxy.background import stop_task
from proxy.core.breaker import State, Transition
from proxy.config.model import AlertSettings, Webhook
from proxy.runtime.metrics import Metrics
from proxy.ops.status import iso

log = logging.getLogger(__name__)

# The `events` a webhook subscribes to (config), by the state a breaker moved to.
EVENT_OF_STATE: dict[State, str] = {
    State.OPEN: "open", State.CLOSED: "close", State.HALF_OPEN: "half_open",
    State.FORCED_OPEN: "forced_open", State.FORCED_CLOSED: "forced_closed", State.DISABLED: "disabled",
}
_FIRING = frozenset({State.OPEN, State.HALF_OPEN, State.FORCED_OPEN})  # calls are being refused
_WORDS = {State.OPEN: "opened", State.CLOSED: "closed", State.HALF_OPEN: "is half-open",
          State.FORCED_OPEN: "was forced open", State.FORCED_CLOSED: "was forced closed",
          State.DISABLED: "was disabled"}
_RETRYABLE_STATUS = frozenset({408, 425, 429})  # and every 5xx


def _where(url: str) -> str:
    """Scheme, host and port only: a webhook path often is the secret (Slack, Teams)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def alert_payload(transition: Transition) -> dict[str, Any]:
    at = iso(transition.at_wall)
    frm, to = transition.from_state, transition.to_state
    service, _, route = transition.breaker.partition(".")
    firing = to in _FIRING
    text = (f"circuit-proxy: breaker {transition.breaker} {_WORDS[to]} "
            f"({frm.value} → {to.value}, {transition.reason})")
    labels = {"alertname": "CircuitBreakerOpen", "breaker": transition.breaker, "service": service,
              "route": route, "severity": "warning" if firing else "info"}
    annotations = {"summary": text}
    alert = {"status": "firing" if firing else "resolved", "labels": labels,
             "annotations": annotations, "startsAt": at,
             "endsAt": None if firing else at}
    return {
        "breaker": transition.breaker, "from_state": frm.value, "to_state": to.value, "at": at,
        "reason": transition.reason, "event": EVENT_OF_STATE[to],
        "text": text,  # Slack / Mattermost / Teams incoming webhooks
        "version": "4", "status": alert["status"], "alerts": [alert],  # Alertmanager-style
        "groupLabels": {"breaker": transition.breaker}, "commonLabels": labels,
        "commonAnnotations": annotations,
    }


class _Receiver:
    """One webhook: its bounded queue and the worker that delivers from it."""

    __slots__ = ("hook", "queue", "worker")

    def __init__(self, hook: Webhook, queue_size: int) -> None:
        self.hook = hook
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self.worker: asyncio.Task[None] | None = None


class Alerter:
    def __init__(self, settings: AlertSettings, metrics: Metrics, *, queue_size: int = 1000,
                 attempts: int = 6, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 timeout_s: float = 5.0) -> None:
        self._metrics = metrics
        self._queue_size = queue_size
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._timeout = ClientTimeout(total=timeout_s)
        self._receivers: list[_Receiver] = []
        self._session: ClientSession | None = None
        self._dropped = 0
        self.configure(settings)

    def configure(self, settings: AlertSettings) -> None:
        """Take the webhooks of a (re)loaded config; unchanged ones keep their queue."""
        old = {receiver.hook: receiver for receiver in self._receivers}
        self._receivers = [old.pop(hook, None) or _Receiver(hook, self._queue_size)
                           for hook in settings.webhooks]
        for receiver in old.values():  # left the config: its pending alerts go with it
            if receiver.worker is not None:
                receiver.worker.cancel()
        if self._session is not None:
            self._start_workers()

    # -- the listener (synchronous, never waits) ---------------------------------------------

    def on_transition(self, transition: Transition) -> None:
        to = transition.to_state
        level = logging.WARNING if to in (State.OPEN, State.FORCED_OPEN) else logging.INFO
        log.log(level, "breaker %s", _WORDS[to], extra={
            "breaker": transition.breaker, "from_state": transition.from_state.value,
            "to_state": to.value, "reason": transition.reason})
        if transition.reason == "restored":
            return  # a restart putting back a stored state; it was alerted when it happened
        event = EVENT_OF_STATE[to]
        payload: dict[str, Any] | None = None
        for receiver in self._receivers:
            if event not in receiver.hook.events:
                continue
            payload = payload or alert_payload(transition)
            try:
                receiver.queue.put_nowait(payload)
            except asyncio.QueueFull:
                self._drop(receiver, transition)

    def _drop(self, receiver: _Receiver, transition: Transition) -> None:
        self._dropped += 1
        self._metrics.webhook_deliveries.labels("dropped").inc()
        if self._dropped == 1 or self._dropped % 100 == 0:
            log.warning("alert webhook queue full: alert dropped (%d so far)", self._dropped,
                        extra={"breaker": transition.breaker, "webhook": _where(receiver.hook.url)})

    # -- background delivery -----------------------------------------------------------------

    async def start(self) -> None:
        self._session = ClientSession(timeout=self._timeout)
        self._start_workers()

    async def stop(self) -> None:
        for receiver in self._receivers:
            if receiver.worker is not None:
                pending = receiver.queue.qsize()
                if pending:
                    log.warning("shutting down with %d alert(s) undelivered", pending,
                                extra={"webhook": _where(receiver.hook.url)})
                await stop_task(receiver.worker)
                receiver.worker = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start_workers(self) -> None:
        for receiver in self._receivers:
            if receiver.worker is None:
                receiver.worker = asyncio.create_task(self._deliver_all(receiver),
                                                      name=f"webhook {_where(receiver.hook.url)}")

    async def _deliver_all(self, receiver: _Receiver) -> None:
        while True:
            payload = await receiver.queue.get()
            result = await self._deliver(receiver.hook, payload)
            self._metrics.webhook_deliveries.labels(result).inc()

    async def _deliver(self, hook: Webhook, payload: dict[str, Any]) -> str:
        """POST until accepted, refused for good, or out of attempts; in order per webhook."""
        assert self._session is not None
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._session.post(hook.url, json=payload) as response:
                    if response.status < 300:
                        return "delivered"
                    problem = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in _RETRYABLE_STATUS:
                        log.warning("alert webhook refused the alert: %s", problem,
                                    extra={"breaker": payload["breaker"], "webhook": _where(hook.url)})
                        return "failed"
            except (ClientError, asyncio.TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self._attempts:
                log.info("alert webhook attempt %d failed (%s); retrying in %.1f s", attempt, problem,
                         delay, extra={"breaker": payload["breaker"], "webhook": _where(hook.url)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
        log.warning("alert webhook gave up after %d attempts: %s", self._attempts, problem,
                    extra={"breaker": payload["breaker"], "webhook": _where(hook.url)})
        return "failed"
