"""What each demo scenario does: its name, what a person reads about it, and the modes it sets.

Data only (no aiohttp, no asyncio): `circuit-proxy` builds its arguments from it without
loading any of the demo's machinery; `scenarios.Scenarios` plays them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONTROL_URL = "http://127.0.0.1:9100"
HEALTHY: dict[str, Any] = {"mode": "healthy"}


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    description: str
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)  # service → PUT …/mode body

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "title": self.title, "description": self.description}


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("payment-outage", "Payment outage",
             "The payment provider goes down (connections refused). Charges within the offline-mode "
             "limits are queued (202) and replayed once it is back; the payment breaker opens.",
             {"payment": {"mode": "down"}}),
    Scenario("inventory-hangs", "Inventory hangs",
             "The stock service takes requests and never answers. The proxy cuts it off after its "
             "timeout and answers estimated stock from its cache: halved, with its age.",
             {"inventory": {"mode": "hang"}}),
    Scenario("notifications-flap", "Notifications flap",
             "The notification service is healthy for 10 s, then answers HTTP 500 for 10 s, and so "
             "on: failures come and go, and the breaker opens when they pile up.",
             {"notification": {"mode": "flap", "period_s": 10, "status": 500}}),
    Scenario("recover", "Everything recovers",
             "Every service is healthy again. Each open breaker goes half-open when its open period "
             "ends and closes after enough good trials; queued charges and notifications are replayed."),
)
