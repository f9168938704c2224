"""/status.json (fixed shape, §6), the /status page, and the StatusBoard behind both.

The board keeps what a breaker does not: its last few transitions, the charts' history
(`proxy.ops.history`) and when each last failure was seen. It is fed by a transition listener
and by the live-status ticker (`proxy.ops.events`), never by requests, so it costs nothing per
call. Words for the operator (plain failure reasons, shop terms) come from `proxy.ops.wording`.
Everything shown on the page is put there with `textContent`, so names from the config or
values from requests are never parsed as HTML. Answers are the project's own `Answer`s: this
module never touches a socket or a web framework.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Protocol

from proxy.core.breaker import Transition
from proxy.core.messages import Answer
from proxy.fallbacks.queue_items import QueueItems
from proxy.ops.history import TAIL, History
from proxy.ops.wording import failure_words, reason_words, shop_term
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry, RouteRuntime

log = logging.getLogger(__name__)

TRANSITIONS_KEPT = 8  # per breaker, newest last

QueueSource = Callable[[], list[dict[str, Any]]]

# The content type the control plane's JSON has always had, kept so no client sees a change;
# the proxy's own contract answers (outcome.py) say plain application/json.
JSON_UTF8 = "application/json; charset=utf-8"


def json_answer(status: int, document: Any, headers: Any = None) -> Answer:
    """A control-plane JSON answer: the document, then the JSON content type after `headers`."""
    answer = Answer(status, json.dumps(document).encode(), headers)
    answer.headers["Content-Type"] = JSON_UTF8
    return answer


def iso(wall: float | None) -> str | None:
    """Epoch seconds → ISO 8601 UTC with milliseconds and a Z, as every document shows time."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StatusBoard:
    """Recent transitions, charted history and last failures per breaker, plus where the queues
    and the demo scenarios come from."""

    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics
        self._transitions: dict[str, deque[dict[str, Any]]] = {}
        self.history = History(registry, metrics)
        # The failure each breaker's runtime last noted, and when the board first saw it.
        self._failures: dict[str, tuple[object, float]] = {}
        # The queue fallbacks report [{"name", "depth", "dead_letter"}] through this.
        self.queues: QueueSource = list
        self.queue_items: QueueItems | None = None  # limits and listings, when the app has queues
        self.scenarios: Scenarios | None = None
        self.cluster: Callable[[], dict[str, Any]] | None = None  # §8 {"connected", …}

    def on_transition(self, transition: Transition) -> None:
        """A breaker listener: remember the transition (non-blocking, bounded)."""
        kept = self._transitions.get(transition.breaker)
        if kept is None:
            kept = self._transitions[transition.breaker] = deque(maxlen=TRANSITIONS_KEPT)
        kept.append({"from_state": transition.from_state.value, "to_state": transition.to_state.value,
                     "at": iso(transition.at_wall), "reason": transition.reason,
                     "reason_text": reason_words(transition.reason)})

    def sample(self) -> None:
        """One tick: the charts' buckets move on, and new failures get their time."""
        routes = self._registry.routes
        self.history.sample(self._registry.clock.wall())
        for runtime in routes.values():
            self._last_failure(runtime)
        for table in (self._transitions, self._failures):
            for name in [name for name in table if name not in routes]:
                del table[name]  # its route left the config

    def _last_failure(self, runtime: RouteRuntime) -> dict[str, Any] | None:
        noted = runtime.last_failure
        if noted is None:
            return None
        seen = self._failures.get(runtime.name)
        if seen is None or seen[0] is not noted:
            # Stamped when first seen (within a tick of the call): no clock read per call.
            seen = self._failures[runtime.name] = (noted, self._registry.clock.wall())
        kind, detail = noted
        policy = runtime.route.policy
        text = failure_words(kind, detail, timeout_ms=policy.timeout_ms,
                             slow_ms=runtime.breaker.slow_threshold_s() * 1000)
        return {"kind": kind, "text": text, "at": iso(seen[1])}

    def extras(self, runtime: RouteRuntime, *, full_history: bool = False) -> dict[str, Any]:
        name = runtime.name
        return {
            "transitions": list(self._transitions.get(name, ())),
            "last_failure": self._last_failure(runtime),
            # Every snapshot carries the bucket under way; the page asks once for the rest.
            "history": self.history.series(name, None if full_history else TAIL),
        }

    def document(self, *, full_history: bool = False) -> dict[str, Any]:
        document = status_document(self._registry, self.queue_documents(), board=self,
                                   full_history=full_history)
        if self.scenarios is not None:
            document["scenarios"] = {"available": self.scenarios.available(),
                                     "running": self.scenarios.running()}
        if self.cluster is not None:  # §8: only a proxy that shares its breakers says this
            document["cluster"] = self.cluster()
        return document

    def queue_documents(self) -> list[dict[str, Any]]:
        """The queues' /status.json entries, as the queues report them (limits, shop terms and
        the requests in the listing: GET /status/queues/<queue>[/items])."""
        return self.queues()

    def entries(self, *, full_history: bool = False) -> list[dict[str, Any]]:
        counts = self._metrics.fallback_counts()  # once per document, not per breaker
        return [self.entry(runtime, counts, full_history=full_history)
                for runtime in self._registry.routes.values()]

    def entry(self, runtime: RouteRuntime, fallback_counts: dict[str, int] | None = None, *,
              full_history: bool = False) -> dict[str, Any]:
        """The breaker's /status.json entry with what the page shows beyond the contract."""
        if fallback_counts is None:
            fallback_counts = self._metrics.fallback_counts()
        entry = breaker_entry(runtime)
        entry["fallbacks_served"] = fallback_counts.get(runtime.name, 0)
        entry.update(self.extras(runtime, full_history=full_history))
        return entry


class Scenarios(Protocol):
    """Demo scenarios the page can start (the living demo hands one to the control plane)."""

    def available(self) -> list[dict[str, Any]]: ...  # [{"name", "title", "description"}]
    def running(self) -> str | None: ...
    async def start(self, name: str) -> None: ...  # KeyError for an unknown name


def breaker_entry(runtime: RouteRuntime) -> dict[str, Any]:
    view = runtime.breaker.view()
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
        "slow_in_flight": view.slow_in_flight,  # calls in flight past the slow threshold (§3a)
        "slow_threshold_ms": round(view.slow_threshold_ms, 3),  # fixed, or learned (auto)
        "waiting_for": view.waiting_for,  # half-open: "probe" or "trial_request"
        "opened_at": iso(view.opened_at_wall),
        "retry_at": iso(view.retry_at_wall),
        "retry_after": view.retry_after,
        "window_calls": view.window.calls,
        "consecutive_failures": view.consecutive_failures,
        "in_flight": runtime.bulkhead.in_flight,
        "upstream": runtime.upstream,
        "fallback": route.fallback.type if route.fallback else None,
        "shop_term": shop_term(route.service, route.fallback.type if route.fallback else None),
        "window_failures": view.window.failures,  # of window_calls: "3 of 3 failed"
        "thresholds": {
            "failure_threshold": policy.failure_threshold,
            "failure_rate_threshold": policy.failure_rate_threshold,
            "slow_call_rate_threshold": policy.slow_call_rate_threshold,
            "slow_call_duration_ms": policy.slow_call_duration_ms,
            "minimum_calls": policy.minimum_calls,
            "max_concurrent": policy.max_concurrent,
        },
    }


def status_document(registry: Registry, queues: list[dict[str, Any]] | None = None, *,
                    board: StatusBoard | None = None, full_history: bool = False) -> dict[str, Any]:
    registry.refresh()  # half_open once retry_at has passed, before anyone reads it (§3)
    if board is None:
        breakers = [breaker_entry(runtime) for runtime in registry.routes.values()]
    else:
        breakers = board.entries(full_history=full_history)
    return {"breakers": breakers, "queues": queues or []}


def status_json_answer(board: StatusBoard, query: str = "") -> Answer:
    """/status.json: computed per request (it is cheap and must be current), never cached.
    `?history=1`: each breaker's whole charted history (15 minutes), not only its last buckets."""
    full_history = "history=1" in query.split("&")
    return json_answer(200, board.document(full_history=full_history), {"Cache-Control": "no-store"})


# -- the page --------------------------------------------------------------------------------

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


def _csp(html: str) -> str:
    """A policy that runs exactly the page's own inline script and style, nothing else."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    return ("default-src 'none'; connect-src 'self'; img-src 'self' data:; "
            f"script-src {' '.join(hashes['script'])}; style-src {' '.join(hashes['style'])}; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StatusPage:
    """The page is read and its policy computed once, when the control plane is built."""

    def __init__(self) -> None:
        html = resources.files("proxy.ops").joinpath("status_page.html").read_text(encoding="utf-8")
        self._body = html.encode()
        self._headers = {"Content-Security-Policy": _csp(html), "X-Content-Type-Options": "nosniff",
                         "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
                         "Content-Type": "text/html; charset=utf-8"}

    def answer(self) -> Answer:
        return Answer(200, self._body, self._headers)
