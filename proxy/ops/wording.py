"""The status page's words: why calls fail and why breakers moved, in plain words, and
fallbacks in shop terms.

A shop operator reads "connection refused" and "estimated stock", not `unreachable` and
`cache`; the technical names stay beside them. Pure: strings in, strings out.
"""

from __future__ import annotations

# The shipped shop's fallbacks by (service, fallback type); any other route gets its type's words.
SHOP_TERMS = {
    ("payment", "queue"): "offline payments",
    ("inventory", "cache"): "estimated stock",
    ("notification", "queue"): "local queue",
    ("shipping", "table"): "fixed costs",
}
TYPE_TERMS = {
    "queue": "stored and sent later",
    "cache": "last known answer",
    "table": "computed answer",
    "static": "canned answer",
}

# Transition reasons (core.transitions.REASONS) as the page says them.
REASON_WORDS = {
    "consecutive_failures": "failures in a row",
    "failure_rate": "failure rate over the threshold",
    "slow_call_rate": "too many slow calls",
    "slow_in_flight": "calls hanging",
    "open_timeout_elapsed": "open period over",
    "success_threshold": "trial calls succeeded",
    "half_open_failure": "a trial call failed",
    "forced": "set by an operator",
    "reset": "reset by an operator",
    "restored": "restored at start-up",
    # §8: the fleet's word, not this proxy's own counts.
    "fleet_open": "opened because the fleet did",
    "fleet_closed": "closed because the fleet did",
}


def reason_words(reason: str | None) -> str:
    """A transition reason as the page says it; an unknown one with its underscores as spaces."""
    if not reason:
        return ""
    return REASON_WORDS.get(reason, reason.replace("_", " "))


def shop_term(service: str, fallback_type: str | None) -> str | None:
    if fallback_type is None:
        return None
    return SHOP_TERMS.get((service, fallback_type), TYPE_TERMS.get(fallback_type))


def _unreachable(detail: str) -> str:
    text = detail.lower()
    if "refused" in text or "errno 111" in text or "connect call failed" in text:
        return "connection refused"
    if "reset" in text:
        return "connection reset by the upstream"
    if "closed by the upstream" in text or "incompleteread" in text or "eof" in text:
        return "connection closed by the upstream"
    if "name or service not known" in text or "nodename" in text or "gaierror" in text:
        return "upstream host name not found (DNS)"
    if text.startswith("tls"):
        return detail
    return f"upstream unreachable ({detail})" if detail else "upstream unreachable"


def failure_words(kind: str, detail: object, *, timeout_ms: int, slow_ms: float) -> str:
    """What the last failed (or slow) call of a route ran into (registry.FAILURE_KINDS)."""
    if kind == "http":
        return f"HTTP {detail} from the upstream"
    if kind == "timeout":
        return f"timeout: no answer within {timeout_ms} ms"
    if kind == "unreachable":
        return _unreachable(str(detail or ""))
    if kind == "broken":
        return "answer cut off mid-body"
    if kind == "slow" and isinstance(detail, (int, float)):
        return f"slow: {detail * 1000:.0f} ms (slow from {slow_ms:.0f} ms)"
    return kind.replace("_", " ")
