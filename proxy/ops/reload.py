"""Hot reload (SIGHUP, POST /admin/reload): re-read, validate, apply, or refuse and keep the old.

The file is read and validated in an executor (it is disk and parsing work); applying is
synchronous on the loop, so a request sees either the old routes or the new ones, never a
mix. Breakers whose settings did not change keep their state and counts (Registry.apply).
Settings that only take effect at start-up (listen address, storage path, logging) are
reported, not applied.

What a reload reports as changed is every route whose settings differ, not only those whose
breaker was rebuilt: a new fallback, match or upstream keeps the breaker's state and counts
(the policy is the same) but is a change all the same. The answer (§6: the list of breakers)
is each breaker's /status.json entry in its contract shape (§6), without the page's history
and details: /status.json has those.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.config.model import Route, Service, Settings
from proxy.config.load import ConfigError, load_settings
from proxy.runtime.metrics import Metrics
from proxy.ops.status import breaker_entry
from proxy.runtime.registry import Registry, ReloadResult

log = logging.getLogger(__name__)

ReloadListener = Callable[[Settings, ReloadResult], None]

# Read once at start: changing them needs a restart.
_AT_START_ONLY = (("server", "host"), ("server", "port"), ("server", "access_log"),
                  ("server", "log_format"), ("storage", "path"), ("admin", "token_env"))


class Reloader:
    def __init__(self, registry: Registry, metrics: Metrics, path: Path | None) -> None:
        self._registry = registry
        self._metrics = metrics
        self._path = path
        self._lock = asyncio.Lock()  # SIGHUP and /admin/reload at once: one after the other
        self._listeners: list[ReloadListener] = []
        # What the process did to the file's settings at start, done again to each reload
        # (the demo points the services at its own fake upstreams).
        self.adjust: Callable[[Settings], Settings] | None = None

    def add_listener(self, listener: ReloadListener) -> None:
        """Called after each applied reload (alerts take new webhooks, storage new rows)."""
        self._listeners.append(listener)

    async def reload(self) -> ReloadResult:
        """Apply the config file as it is now, or raise ConfigError and change nothing."""
        async with self._lock:
            try:
                if self._path is None:
                    raise ConfigError(["the proxy was not started from a config file: nothing to reload"])
                loop = asyncio.get_running_loop()
                settings = await loop.run_in_executor(None, load_settings, self._path)
                if self.adjust is not None:
                    settings = self.adjust(settings)
            except ConfigError as exc:
                self._metrics.reloads.labels("rejected").inc()
                log.error("config reload refused, the running config is kept: %d problem(s)",
                          len(exc.problems))
                for problem in exc.problems:
                    log.error("config problem: %s", problem)
                raise
            old = self._registry.settings
            result = self._registry.apply(settings)
            _report_route_changes(old, settings, result)
            for listener in self._listeners:
                listener(settings, result)
            self._metrics.reloads.labels("applied").inc()
            for section, key in _AT_START_ONLY:
                if getattr(getattr(old, section), key) != getattr(getattr(settings, section), key):
                    log.warning("%s.%s changed: it takes effect at the next restart", section, key)
            log.info("config reloaded: %d added, %d removed, %d changed, %d kept",
                     len(result.added), len(result.removed), len(result.changed), len(result.kept),
                     extra={"added": ",".join(result.added) or "-",
                            "removed": ",".join(result.removed) or "-",
                            "changed": ",".join(result.changed) or "-"})
            return result

    async def reload_logged(self) -> None:
        """For SIGHUP: nobody to answer, the outcome is in the log."""
        try:
            await self.reload()
        except ConfigError:
            pass  # logged above, old config kept


# The §6 fields of a /status.json entry: ~200 bytes a breaker, where the page's is ~1.3 KB.
_ANSWER_KEYS = ("name", "service", "route", "state", "failure_rate", "calls", "opened_at", "retry_at")


def reload_entries(registry: Registry) -> list[dict[str, Any]]:
    """The reload answer: every breaker's /status.json entry, without its history."""
    entries = []
    for runtime in registry.routes.values():
        entry = breaker_entry(runtime)
        entries.append({key: entry[key] for key in _ANSWER_KEYS if key in entry})
    return entries


def _routes_by_breaker(settings: Settings) -> dict[str, tuple[Route, Service]]:
    return {route.breaker_name: (route, service) for service in settings.services for route in service.routes}


def _report_route_changes(old: Settings, new: Settings, result: ReloadResult) -> None:
    """Move to `changed` the kept breakers whose route changed around an unchanged policy."""
    before, after = _routes_by_breaker(old), _routes_by_breaker(new)

    def differs(name: str) -> bool:
        (route, service), (route_now, service_now) = before[name], after[name]
        return (route != route_now or service.upstream != service_now.upstream
                or service.tls != service_now.tls)

    moved = [name for name in result.kept if name in before and name in after and differs(name)]
    if moved:
        result.kept[:] = [name for name in result.kept if name not in moved]
        changed = set(result.changed) | set(moved)
        result.changed[:] = [name for name in after if name in changed]  # in config order


def reload_on_sighup(reloader: Reloader) -> Callable[[], None]:
    """Reload whenever the process gets SIGHUP, until the returned function is called."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()  # a reference, so a reload is not collected mid-way

    def on_sighup() -> None:
        log.info("SIGHUP: reloading the config")
        task = loop.create_task(reloader.reload_logged(), name="reload")
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)
