"""Retries (§3b): idempotent requests (or ones with an Idempotency-Key) whose attempt failed
before anything reached the client, each attempt with a breaker permit of its own, within the
route's retry budget, after a fully jittered backoff. A mixin of `Exchange`, split out along
that seam; the backoff waits on the same deadline sweep as the timeouts (no timer of its own).
"""

from __future__ import annotations

from typing import Any

from proxy.core.breaker import State
from proxy.http.states import RETRY_WAIT

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
_IDEMPOTENCY_KEY = b"idempotency-key"
_NO_RETRY_STATES = (State.OPEN, State.FORCED_OPEN)


class Retrying:
    __slots__ = ()
    env: Any
    client: Any
    runtime: Any
    head: Any

    def _may_be_retried(self, retry: Any) -> bool:
        """§3b: idempotent methods or an Idempotency-Key only, and a body small enough to hold."""
        head = self.head
        if head.method not in _IDEMPOTENT and not any(lname == _IDEMPOTENCY_KEY
                                                      for _, lname, _ in head.fields):
            return False
        if not self.has_body:
            return True
        return head.content_length is not None and head.content_length <= retry.max_body_bytes

    # -- retries (§3b) ------------------------------------------------------------------------

    def _retry(self, responded: bool) -> bool:
        """The attempt failed, with nothing sent to the client yet, and is recorded: try again
        if the route may (attempts left, a breaker permit of its own, the budget)."""
        runtime = self.runtime
        retry = runtime.retry
        if retry is None or self.attempt >= retry.attempts or self.client.lost:
            return False
        breaker = runtime.breaker
        # Asked after the failed attempt was recorded: if that opened the breaker, no retry.
        permit = None if breaker.state in _NO_RETRY_STATES else breaker.try_acquire()
        if permit is None:
            self._count_retry("rejected")  # never into an open breaker or a full half-open
            return False
        if not runtime.retry_budget.try_spend(self.env.clock.monotonic()):
            runtime.release(permit)
            self._count_retry("budget_exhausted")
            return False
        self._cancel_deadline()
        if responded:
            self._drop_upstream()  # the failed answer is not read on: the connection goes
        else:
            self.upstream = None
        self.attempt += 1
        self.permit = permit
        self.state = RETRY_WAIT
        # Full jitter: retries of many clients spread over the whole backoff, never in step.
        delay = self.env.rng.uniform(0.0, retry.backoff_ms * 2 ** (self.attempt - 1)) / 1000
        self.env.deadlines.add(self, delay)
        return True

    def _count_retry(self, result: str) -> None:
        child = self.runtime.metrics.retries.get(result)
        if child is not None:
            child.inc()
