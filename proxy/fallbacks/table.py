"""`table`: an answer computed from a lookup table in the config (§5; shipping "fixed costs").

The request's JSON body names a key (`destination.country`) that picks a zone (a row), or the
default row; the row's `cost` plus `per_kg` × the weight field is the price. The answer looks
like the real service's (`carrier`, `cost`, `currency`, `eta_days`) plus `zone` and
`"estimated": true`. A body that cannot be read never fails the fallback: it gets the default
row at its base cost. Everything is computed from memory; nothing here awaits the network.
"""

from __future__ import annotations

import logging
import math
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.config.model import Route
from proxy.core.messages import Answer, Request
from proxy.fallbacks.base import (
    FallbackContext,
    Recorder,
    dig,
    json_or_none,
    request_body,
)

if TYPE_CHECKING:
    from proxy.fallbacks.build import FallbackDeps

log = logging.getLogger(__name__)

BODY_LIMIT = 65_536
_CENT = Decimal("0.01")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return value
    return None


class TableFallback:
    type = "table"
    buffer_request_bytes = BODY_LIMIT

    def __init__(self, route: Route, deps: FallbackDeps) -> None:
        spec = route.fallback
        assert spec is not None
        options = spec.options
        self.on_failure = spec.on_failure
        self.key = tuple(str(options["key"]).split("."))
        self.weight = tuple(str(options["weight_field"]).split("."))
        self.status = int(options.get("status") or 200)
        self.zones: dict[str, str] = {str(k).upper(): v for k, v in options["zones"].items()}
        self.default_row: str = options["default_row"]
        # Decimal once, at load: money is rounded to the cent the same way for every request.
        self.rows: dict[str, tuple[Decimal, Decimal, dict[str, Any]]] = {
            name: (Decimal(repr(row["cost"])), Decimal(repr(row.get("per_kg", 0))), {
                "carrier": row.get("carrier", "fixed-rate"),
                "currency": row.get("currency", "USD"),
                "eta_days": row.get("eta_days"),
            }) for name, row in options["rows"].items()}

    def quote(self, document: Any) -> dict[str, Any]:
        value = dig(document, self.key)
        zone = self.zones.get(value.strip().upper(), self.default_row) if isinstance(value, str) else self.default_row
        base, per_kg, fixed = self.rows[zone]
        weight = _number(dig(document, self.weight))
        cost = base + per_kg * Decimal(repr(weight)) if weight is not None else base
        return {"carrier": fixed["carrier"], "cost": float(cost.quantize(_CENT, ROUND_HALF_UP)),
                "currency": fixed["currency"], "eta_days": fixed["eta_days"], "zone": zone,
                "estimated": True}

    async def serve(self, request: Request, ctx: FallbackContext) -> Answer | None:
        answer = self.quote(json_or_none(await request_body(request, ctx, BODY_LIMIT)))
        request.detail = f"zone={answer['zone']}"
        return Answer.json(self.status, answer, {"X-Fallback-Estimated": "true"})

    def recorder(self, request: Request, status: int, headers: CIMultiDict[str]) -> Recorder | None:
        return None
