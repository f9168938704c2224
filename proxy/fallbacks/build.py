"""Picks and builds a route's fallback (`build_fallback`); a queue gets its `ReplayWorker` here.

The only module of the package that knows every fallback type: `base` must not (the types
import it), and `queue` must not know `replay` (replay imports queue), so the two are joined
here. Building reads response files and compiles templates, once per config, never per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config.model import Route
from proxy.core.clock import Clock
from proxy.fallbacks.base import Fallback
from proxy.fallbacks.cache import CacheFallback
from proxy.fallbacks.cache_store import CacheStore
from proxy.fallbacks.queue import QueueBook
from proxy.fallbacks.replay import ReplayWorker
from proxy.fallbacks.static import StaticFallback
from proxy.fallbacks.table import TableFallback
from proxy.storage.sqlite import Storage

if TYPE_CHECKING:
    from proxy.runtime.metrics import Metrics
    from proxy.runtime.registry import Registry

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class FallbackDeps:
    """What building fallbacks needs; one per app. `registry` is set once it exists."""

    clock: Clock
    fallback_dir: Path | None
    storage: Storage | None = None
    metrics: Metrics | None = None
    queues: QueueBook | None = None
    registry: Registry | None = None
    cache_store: CacheStore | None = None  # cache entries written behind, restored at start


def build_fallback(route: Route, deps: FallbackDeps | None) -> Fallback | None:
    """The route's fallback, built once per config (files read, templates compiled)."""
    spec = route.fallback
    if spec is None or deps is None:
        return None
    if spec.type == "static":
        return StaticFallback(route, deps)
    if spec.type == "cache":
        return CacheFallback(route, deps)
    if spec.type == "table":
        return TableFallback(route, deps)
    if spec.type == "queue":
        if deps.queues is None:
            raise RuntimeError(f"{route.breaker_name}: a queue fallback needs storage")
        return deps.queues.fallback(route, ReplayWorker)
    raise ValueError(f"{route.breaker_name}: unknown fallback type {spec.type!r}")
