"""/status.json (fixed shape, §6); the live page and SSE come with the observability issue."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from proxy.breaker import BreakerView
from proxy.registry import Registry, RouteRuntime


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def breaker_entry(runtime: RouteRuntime, view: BreakerView | None = None) -> dict[str, Any]:
    view = view or runtime.breaker.view()
    route = runtime.route
    policy = route.policy
    return {
        "name": runtime.name,
        "service": route.service,
        "route": route.name,
        "state": view.state.value,
        "failure_rate": view.failure_rate,
        "slow_call_rate": view.slow_call_rate,
        "calls": {"success": view.calls_success, "failure": view.calls_failure,
                  "rejected": view.calls_rejected},
        "slow_calls": view.slow_calls,
        "opened_at": iso(view.opened_at_wall),
        "retry_at": iso(view.retry_at_wall),
        "retry_after": view.retry_after,
        "in_flight": runtime.bulkhead.in_flight,
        "fallback": route.fallback.type if route.fallback else None,
        "thresholds": {
            "failure_threshold": policy.failure_threshold,
            "failure_rate_threshold": policy.failure_rate_threshold,
            "slow_call_rate_threshold": policy.slow_call_rate_threshold,
            "slow_call_duration_ms": policy.slow_call_duration_ms,
            "minimum_calls": policy.minimum_calls,
            "max_concurrent": policy.max_concurrent,
        },
    }


def status_document(registry: Registry, queues: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "breakers": [breaker_entry(runtime) for runtime in registry.routes.values()],
        "queues": queues or [],
    }


def status_json_handler(registry: Registry):
    async def status_json(request: web.Request) -> web.Response:
        return web.json_response(status_document(registry))
    return status_json
