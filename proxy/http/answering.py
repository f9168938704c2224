"""What a call that gets no upstream answer gets instead: the route's fallback, or the
contract's answer (§4) from `core.outcome`. A mixin of `Exchange`, split out along that seam:
it uses the exchange's own state (declared in `Exchange.__slots__`) and never the server.
"""

from __future__ import annotations

import logging
from typing import Any

from multidict import CIMultiDict

from proxy.core import outcome
from proxy.core.messages import Answer, Request
from proxy.core.outcome import Reason
from proxy.fallbacks.base import FallbackContext
from proxy.http import wire
from proxy.http.body import BodyReader, SENT_UPSTREAM
from proxy.http.states import DONE, FALLBACK

log = logging.getLogger(__name__)

# What only a trusted proxy may tell (server.trusted_proxies): from anyone else, a fallback
# (and a queued request's stored headers) never sees them.
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"})


class Answering:
    __slots__ = ()
    env: Any
    client: Any
    runtime: Any
    head: Any

    # -- failures and rejections: the contract's answers or the route's fallback ------------

    def _call_failed(self, reason: Reason, maybe_delivered: bool, detail: str) -> None:
        """A call let through got no response: the fallback if it is safe, else 502 / 504 (§4)."""
        self._cancel_deadline()
        self._record_attempt(True)
        self.runtime.note_failure(reason, detail)  # the status page's "last failure"
        if self.retryable and self._retry(False):
            return
        runtime = self.runtime
        fallback = runtime.fallback
        if fallback is not None and fallback.on_failure:
            self._start_fallback(reason, maybe_delivered, detail)
            return
        self._answer_without_fallback(reason, detail)

    def _reject(self, reason: Reason, retry_after: float | None) -> None:
        if self.runtime.fallback is not None:
            self._start_fallback(reason, False, "")
            return
        self._answer_without_fallback(reason, "", retry_after)

    def _answer_without_fallback(self, reason: Reason, detail: str,
                                 retry_after: float | None = None) -> None:
        """The contract's answer for `reason` (§4)."""
        self.state = DONE
        keep_alive = self._keep_alive_after_answer()
        runtime = self.runtime
        if reason in outcome.BREAKER_REJECTIONS:
            if retry_after is None:
                _, retry_after = outcome.rejection(runtime.breaker)
            # The open path: its bytes are built from parts made once per breaker.
            data = wire.circuit_open(runtime.name, retry_after, keep_alive=keep_alive,
                                     head_only=self.head_only)
            self._answer(data, 503, keep_alive)
            return
        answer = outcome.without_fallback(reason, runtime.breaker, runtime.timeout_s, detail)
        if runtime.retry is not None and reason in outcome.LET_THROUGH:
            answer.headers["X-Retry-Count"] = str(self.attempt)
        self._answer(wire.answer_bytes(answer, keep_alive=keep_alive, head_only=self.head_only),
                     answer.status, keep_alive)

    def _answer(self, data: bytes, status: int, keep_alive: bool) -> None:
        self.client.write(data)
        self._leave()
        self.runtime.metrics.count_request(status, self.env.clock.monotonic() - self.started)
        self.client.exchange_done(self, keep_alive=keep_alive)

    def _keep_alive_after_answer(self) -> bool:
        """Keep the connection when the rest of the request body can be read and dropped."""
        if not self.keep_alive or self.env.draining:
            return False
        if self.request_done:
            return True
        if self.head.expect_continue and self.permit is None and not self.request_sent:
            return False  # the client may be waiting for 100 Continue that will not come
        return self.client.can_discard()

    # -- fallbacks ---------------------------------------------------------------------------

    def _start_fallback(self, reason: Reason, maybe_delivered: bool, detail: str) -> None:
        self.state = FALLBACK
        self.pending.clear()
        if reason in outcome.LET_THROUGH:
            request = self.request_view(self.buffered if self.buffered is not None else None,
                                        sent=self.buffered is None and self.has_body)
        elif self.has_body and not self.request_done:
            # Rejected before the body was read: the fallback may read it from the client.
            self.reader = BodyReader(self._continue)
            request = self.request_view(None, source=self.reader)
        else:
            request = self.request_view(None)
        self.task = self.env.loop.create_task(self._fallback(request, reason, maybe_delivered, detail))

    def _continue(self) -> None:
        """A fallback started to read a body the client waits to send (Expect: 100-continue)."""
        if self.head.expect_continue and self.permit is None and not self.client.lost:
            self.client.write(wire.CONTINUE)

    async def _fallback(self, request: Request, reason: Reason, maybe_delivered: bool, detail: str) -> None:
        runtime = self.runtime
        fallback = runtime.fallback
        assert fallback is not None
        view = runtime.breaker.view()
        answer: Answer | None
        try:
            answer = await fallback.serve(request, FallbackContext(view, reason, maybe_delivered,
                                                                   self.buffered))
        except Exception:
            log.exception("fallback of %s failed", runtime.name)
            answer = None
        finally:
            self.task = None
        if self.state != FALLBACK:
            return  # the client left, or broke its request, meanwhile
        self.reader = None
        if answer is None:
            self._answer_without_fallback(reason, detail)
            return
        self.state = DONE
        answer.headers["X-Circuit-Breaker"] = runtime.name
        answer.headers["X-Circuit-State"] = view.state.value
        answer.headers["X-Fallback"] = fallback.type
        if runtime.retry is not None and reason in outcome.LET_THROUGH:
            answer.headers["X-Retry-Count"] = str(self.attempt)  # §3b: after its last attempt
        if runtime.metrics.fallback is not None:
            runtime.metrics.fallback.inc()
        if self.env.fallback_log is not None:
            self.env.fallback_log(runtime.name, fallback.type, request, answer.status, reason.value)
        keep_alive = self._keep_alive_after_answer()
        self._answer(wire.answer_bytes(answer, keep_alive=keep_alive, head_only=self.head_only),
                     answer.status, keep_alive)

    def request_view(self, body: bytes | None, *, source: Any = None, sent: bool = False) -> Request:
        """The request as a fallback sees it (built only when one is asked)."""
        request = self.request
        if request is None:
            head = self.head
            trusted = getattr(self.client, "trusted", True)
            headers = CIMultiDict((name.decode("latin-1"), value.decode("latin-1"))
                                  for name, lname, value in head.fields
                                  if trusted or lname not in _FORWARDED)
            peer = self.client.peer_ip
            request = self.request = Request(
                head.method.decode("ascii"), head.target.decode("latin-1"), headers,
                client_ip=peer.decode() if peer else None, scheme=self.env.scheme.decode())
        if body is not None:
            request.body = body
        elif sent:
            request.source = SENT_UPSTREAM
        elif source is not None:
            request.source = source
        return request
