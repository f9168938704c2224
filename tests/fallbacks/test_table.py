"""proxy/fallbacks/table.py: prices computed from the config's table."""

from __future__ import annotations

import json

from multidict import CIMultiDict

from proxy.config.model import FallbackSpec, Match, Policy, Route
from proxy.core.breaker import Breaker
from proxy.core.clock import FakeClock
from proxy.core.messages import Request
from proxy.core.outcome import Reason
from proxy.fallbacks.base import FallbackContext
from proxy.fallbacks.build import FallbackDeps, build_fallback
from proxy.fallbacks.table import TableFallback

OPTIONS = {"key": "destination.country", "weight_field": "weight_kg", "status": 200,
           "zones": {"IT": "domestic", "DE": "eu"}, "default_row": "world",
           "rows": {"domestic": {"carrier": "poste", "cost": 6.9, "per_kg": 0.5, "currency": "EUR", "eta_days": 3},
                    "eu": {"cost": 12.9, "per_kg": 1.0},
                    "world": {"carrier": "fixed-rate", "cost": 34.9, "per_kg": 3, "currency": "EUR", "eta_days": 12}}}


def table(**options) -> TableFallback:
    route = Route(service="shipping", name="quotes", match=Match(), policy=Policy(),
                  fallback=FallbackSpec(type="table", options={**OPTIONS, **options}))
    fallback = build_fallback(route, FallbackDeps(clock=FakeClock(), fallback_dir=None))
    assert isinstance(fallback, TableFallback)
    return fallback


def context(reason: Reason, body: bytes | None = None) -> FallbackContext:
    view = Breaker("shipping.quotes", Policy(), FakeClock()).view()
    return FallbackContext(view=view, reason=reason, maybe_delivered=False, body=body)


class Source:
    """A client body not read yet (what the HTTP server hands a Request)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.reads = 0

    async def read(self, limit: int) -> bytes | None:
        self.reads += 1
        return self.body if len(self.body) <= limit else None


def quote_request(document: object, **kwargs) -> Request:
    return Request("POST", "/shipping/quotes?x=1", CIMultiDict({"Content-Type": "application/json"}),
                   **kwargs, source=Source(json.dumps(document).encode()))


def test_zone_rows_priced_by_weight_to_the_cent():
    assert table().quote({"destination": {"country": " it "}, "weight_kg": 1.005}) == {
        "carrier": "poste", "cost": 7.4, "currency": "EUR", "eta_days": 3, "zone": "domestic",
        "estimated": True}  # 6.9 + 0.5025 = 7.4025
    assert table().quote({"destination": {"country": "DE"}, "weight_kg": 2}) == {
        "carrier": "fixed-rate", "cost": 14.9, "currency": "USD", "eta_days": None, "zone": "eu",
        "estimated": True}  # a row without carrier, currency, eta_days gets the defaults


def test_anything_unusable_gets_the_default_row_at_base_cost():
    for document in (None, [], {"destination": "IT"}, {"destination": {"country": 7}, "weight_kg": -1},
                     {"weight_kg": True}, {"weight_kg": float("nan")}):
        assert table().quote(document)["cost"] == 34.9


def test_other_keys_and_weights():
    fallback = table(key="country", weight_field="parcel.kg")
    assert fallback.quote({"country": "de", "parcel": {"kg": 0.5}})["cost"] == 13.4


async def test_serve_reads_the_body_and_answers_json():
    request = quote_request({"destination": {"country": "IT"}, "weight_kg": 2})
    answer = await table(status=203).serve(request, context(Reason.OPEN))
    assert answer is not None
    assert (answer.status, answer.headers["Content-Type"], answer.headers["X-Fallback-Estimated"]) == (
        203, "application/json", "true")
    assert json.loads(answer.body) == {"carrier": "poste", "cost": 7.9, "currency": "EUR", "eta_days": 3,
                                       "zone": "domestic", "estimated": True}
    assert request.detail == "zone=domestic"


async def test_a_body_that_went_upstream_gets_the_default_row():
    # Let through and streamed (not buffered): nothing is left to read, and nothing is tried.
    request = quote_request({"destination": {"country": "IT"}})
    answer = await table().serve(request, context(Reason.TIMEOUT))
    assert answer is not None and json.loads(answer.body)["zone"] == "world"
    assert request.source.reads == 0  # type: ignore[union-attr]
    # Buffered for the fallback before the call: the body is used although the call timed out.
    buffered = json.dumps({"destination": {"country": "DE"}}).encode()
    answer = await table().serve(quote_request({}), context(Reason.TIMEOUT, buffered))
    assert answer is not None and json.loads(answer.body)["zone"] == "eu"
