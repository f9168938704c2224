"""What a call's outcome means, decided once for the exchange, the fallbacks and replay (§3, §4).

Which results are failures, why a call was rejected and the `Retry-After` that goes with it,
and every contract answer a client can get instead of the upstream's (404, 400, 413, 431,
502, 503, 504): their JSON documents and headers. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from proxy.core.messages import Answer

if TYPE_CHECKING:
    from proxy.core.breaker import Breaker


class Reason(StrEnum):
    """Why a call did not get the upstream's answer (fallback_logs, fallbacks, metrics)."""

    OPEN = "open"
    FORCED_OPEN = "forced_open"
    HALF_OPEN_FULL = "half_open_full"
    BULKHEAD_FULL = "bulkhead_full"
    UNREACHABLE = "unreachable"  # refused, reset, DNS, TLS: no response
    TIMEOUT = "timeout"  # the route's timeout expired


# The call was let through: its body went (or was going) upstream.
LET_THROUGH = frozenset({Reason.UNREACHABLE, Reason.TIMEOUT})
# The breaker refused a permit: 503 circuit_open without a fallback.
BREAKER_REJECTIONS = frozenset({Reason.OPEN, Reason.FORCED_OPEN, Reason.HALF_OPEN_FULL})
_REJECTED_BY_STATE = {"open": Reason.OPEN, "forced_open": Reason.FORCED_OPEN}


def is_failure(status: int, failure_statuses: frozenset[int]) -> bool:
    """A response is a failure only when its status is listed; 4xx are the client's fault (§3)."""
    return status in failure_statuses


def rejection(breaker: Breaker) -> tuple[Reason, float | None]:
    """Why the breaker refused a permit, and the seconds until half-open (None: forced open)."""
    state = breaker.state
    reason = _REJECTED_BY_STATE.get(state, Reason.HALF_OPEN_FULL)  # a StrEnum is its value as a key
    retry_after = None if reason is Reason.FORCED_OPEN else (breaker.retry_after() or 0.0)
    return reason, retry_after


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up, at least 1 (§4)."""
    return str(max(1, math.ceil(seconds)))


def retry_after_value(seconds: float) -> float:
    """The `retry_after` number of a circuit_open body: seconds, to the millisecond."""
    return round(max(0.0, seconds), 3)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A whole upstream call made outside a client exchange (queue replay)."""

    status: int | None  # None: no response (see `reason`)
    body: bytes = b""
    reason: Reason | None = None  # UNREACHABLE or TIMEOUT when there is no response
    sent: bool = False  # the upstream may have received the request
    detail: str = ""


# -- the contract's answers (§4) --------------------------------------------------------------

def circuit_open(breaker: str, retry_after: float | None) -> Answer:
    """503 for a call the breaker rejected; no Retry-After while forced open."""
    document = {"error": "circuit_open", "breaker": breaker,
                "retry_after": None if retry_after is None else retry_after_value(retry_after)}
    headers = None if retry_after is None else {"Retry-After": retry_after_header(retry_after)}
    return Answer.json(503, document, headers)


def bulkhead_full(breaker: str) -> Answer:
    return Answer.json(503, {"error": "bulkhead_full", "breaker": breaker}, {"Retry-After": "1"})


def upstream_unreachable(breaker: str, detail: str) -> Answer:
    return Answer.json(502, {"error": "upstream_unreachable", "breaker": breaker,
                             "detail": detail or "connection failed"})


def upstream_timeout(breaker: str, timeout_s: float) -> Answer:
    return Answer.json(504, {"error": "upstream_timeout", "breaker": breaker, "timeout_s": timeout_s})


def without_fallback(reason: Reason, breaker: Breaker, timeout_s: float, detail: str = "") -> Answer:
    """The contract's answer for `reason` when no fallback answered."""
    if reason is Reason.BULKHEAD_FULL:
        return bulkhead_full(breaker.name)
    if reason is Reason.TIMEOUT:
        return upstream_timeout(breaker.name, timeout_s)
    if reason is Reason.UNREACHABLE:
        return upstream_unreachable(breaker.name, detail)
    return circuit_open(breaker.name, rejection(breaker)[1])


def unknown_service(service: str) -> Answer:
    return Answer.json(404, {"error": "unknown_service", "service": service})


def not_found(path: str) -> Answer:
    return Answer.json(404, {"error": "not_found", "path": path})


def bad_request(detail: str) -> Answer:
    return Answer.json(400, {"error": "bad_request", "detail": detail})


def payload_too_large(limit: int) -> Answer:
    return Answer.json(413, {"error": "payload_too_large", "max_body_bytes": limit})


def headers_too_large(limit: int) -> Answer:
    return Answer.json(431, {"error": "request_header_fields_too_large", "max_header_bytes": limit})
