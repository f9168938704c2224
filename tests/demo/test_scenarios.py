"""proxy/demo/scenarios.py: each scenario sets the fakes' modes through the real control API."""

from __future__ import annotations

import pytest

from fake_upstreams import FakeUpstreams
from proxy.demo.scenarios import ScenarioError, Scenarios
from tests.real_tools import free_port


def modes(fakes: FakeUpstreams) -> dict[str, dict]:
    return {name: fakes.mode(name).as_dict() for name in ("payment", "inventory", "notification", "shipping")}


HEALTHY = {"mode": "healthy"}


def test_available_lists_name_title_and_description_in_order():
    available = Scenarios().available()
    assert [s["name"] for s in available] == ["payment-outage", "inventory-hangs", "notifications-flap", "recover"]
    assert all(set(s) == {"name", "title", "description"} and s["title"] and len(s["description"]) > 40
               for s in available)


async def test_each_scenario_sets_every_service_and_recover_heals_them(fakes):
    scenarios = Scenarios(fakes.control_url + "/", modes=fakes.describe)
    assert scenarios.running() is None
    await scenarios.start("payment-outage")
    assert modes(fakes) == {"payment": {"mode": "down"}, "inventory": HEALTHY, "notification": HEALTHY,
                            "shipping": HEALTHY}
    assert scenarios.running() == "payment-outage"
    # One scenario at a time: the next one heals what the last one broke.
    await scenarios.start("notifications-flap")
    assert modes(fakes) == {"payment": HEALTHY, "inventory": HEALTHY, "shipping": HEALTHY,
                            "notification": {"mode": "flap", "period_s": 10.0, "status": 500}}
    assert scenarios.running() == "notifications-flap"
    await scenarios.start("inventory-hangs")
    assert (modes(fakes)["inventory"], modes(fakes)["notification"]) == ({"mode": "hang"}, HEALTHY)
    # A mode flipped by hand (control page, curl) is seen: no scenario is in force any more.
    await fakes.set_mode("shipping", "slow", latency_ms=5)
    assert scenarios.running() is None
    await scenarios.start("recover")
    assert set(map(str, (m["mode"] for m in modes(fakes).values()))) == {"healthy"}
    assert scenarios.running() is None


async def test_without_a_mode_source_running_is_what_was_started_here(fakes):
    scenarios = Scenarios(fakes.control_url)
    await scenarios.start("inventory-hangs")
    assert scenarios.running() == "inventory-hangs"
    await scenarios.start("recover")
    assert scenarios.running() is None


async def test_unknown_name_is_a_key_error_and_changes_nothing(fakes):
    scenarios = Scenarios(fakes.control_url)
    with pytest.raises(KeyError):
        await scenarios.start("meteor-strike")
    assert fakes.requests("payment") == 0 and fakes.mode("payment").mode == "healthy"


async def test_an_unreachable_control_api_is_a_scenario_error_that_says_so():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ScenarioError, match="control API cannot be reached"):
        await Scenarios(url).start("payment-outage")
