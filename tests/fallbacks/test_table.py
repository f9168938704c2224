"""proxy/fallbacks/table.py: prices computed from the config's table."""

from __future__ import annotations

from proxy.core.clock import FakeClock
from proxy.config.model import FallbackSpec, Match, Policy, Route
from proxy.fallbacks.base import FallbackDeps
from proxy.fallbacks.table import TableFallback

OPTIONS = {"key": "destination.country", "weight_field": "weight_kg", "status": 200,
           "zones": {"IT": "domestic", "DE": "eu"}, "default_row": "world",
           "rows": {"domestic": {"carrier": "poste", "cost": 6.9, "per_kg": 0.5, "currency": "EUR", "eta_days": 3},
                    "eu": {"cost": 12.9, "per_kg": 1.0},
                    "world": {"carrier": "fixed-rate", "cost": 34.9, "per_kg": 3, "currency": "EUR", "eta_days": 12}}}


def table(**options) -> TableFallback:
    route = Route(service="shipping", name="quotes", match=Match(), policy=Policy(),
                  fallback=FallbackSpec(type="table", options={**OPTIONS, **options}))
    return TableFallback(route, FallbackDeps(clock=FakeClock(), fallback_dir=None))


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
