"""The status page's words: failure and transition reasons in plain words, fallbacks in shop terms."""

from __future__ import annotations

import pytest

from proxy.core.breaker import REASONS
from proxy.ops.wording import REASON_WORDS, failure_words, reason_words, shop_term


@pytest.mark.parametrize(("kind", "detail", "words"), [
    ("http", 500, "HTTP 500 from the upstream"),
    ("http", 503, "HTTP 503 from the upstream"),
    ("timeout", None, "timeout: no answer within 250 ms"),
    ("unreachable", "[Errno 111] Connect call failed ('127.0.0.1', 9101)", "connection refused"),
    ("unreachable", "ConnectionResetError", "connection reset by the upstream"),
    ("unreachable", "connection closed by the upstream", "connection closed by the upstream"),
    ("unreachable", "[Errno -2] Name or service not known", "upstream host name not found (DNS)"),
    ("unreachable", "TLS: certificate verify failed: unable to get local issuer certificate",
     "TLS: certificate verify failed: unable to get local issuer certificate"),
    ("unreachable", "", "upstream unreachable"),
    ("unreachable", "OSError", "upstream unreachable (OSError)"),
    ("broken", None, "answer cut off mid-body"),
    ("slow", 2.3456, "slow: 2346 ms (slow from 2000 ms)"),
])
def test_failures_in_plain_words(kind, detail, words):
    assert failure_words(kind, detail, timeout_ms=250, slow_ms=2000.0) == words


def test_shop_terms_name_the_shop_fallbacks_and_fall_back_to_the_type():
    assert [shop_term(s, t) for s, t in (("inventory", "cache"), ("payment", "queue"), ("notification", "queue"),
                                         ("shipping", "table"), ("billing", "queue"), ("catalog", "static"),
                                         ("payment", None))] == [
        "estimated stock", "offline payments", "local queue", "fixed costs", "stored and sent later",
        "canned answer", None]


def test_every_transition_reason_has_plain_words():
    assert set(REASON_WORDS) == set(REASONS)  # a reason the breaker gains needs its words here
    assert (reason_words("fleet_open"), reason_words("fleet_closed")) == (
        "opened because the fleet did", "closed because the fleet did")
    assert (reason_words("consecutive_failures"), reason_words("some_new_reason"), reason_words(None)) == (
        "failures in a row", "some new reason", "")
