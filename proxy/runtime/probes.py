"""Recovery without customer traffic: the proxy's own half-open trials for routes with `probe`.

With `probe: {path, method, interval_ms, expect_status}` on a route, a half-open breaker gives
customers no permit (they keep getting the fallback or 503 circuit_open) and the `Prober`
sends the probe request itself as the trial: one task per probed route. While the breaker is
open the task sleeps until the open period ends (`retry_after()`, bounded by `interval_ms`
so a clock that moves on its own is noticed, and woken at once by any transition of that
breaker); while half-open it takes a trial permit (`try_acquire_trial`, which also performs
the lazy open → half_open), sends the probe through the app's pooled `UpstreamClient` and
records the outcome on the route as any call is recorded, then waits `interval_ms` before
the next one. `success_threshold` successes close the breaker; a failure re-opens it, and
the next probe comes when the new open period ends. Otherwise the task waits for the next
transition.

Tasks follow the config: `start()` starts one per probed route, `on_reload` (a reload
listener) starts and stops them as routes gain or lose a probe, and a task reads its route
from the registry on every turn, so a breaker rebuilt by a reload is the one probed next.

This module must never probe a breaker that is closed, forced open, forced closed or
disabled (only a half-open trial permit lets a probe go), never send a probe without a
permit or keep one it did not record (a probe cancelled mid-flight gives it back), never
hold more than one probe in flight per route, and never open a connection of its own: it
reaches the upstream only through the injected client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.background import stop_task, wait_event
from proxy.config.model import ProbeSpec, Settings
from proxy.core.breaker import State, Transition
from proxy.core.clock import Clock

if TYPE_CHECKING:
    from proxy.fallbacks.base import UpstreamClient
    from proxy.runtime.registry import Registry, ReloadResult, RouteRuntime

log = logging.getLogger(__name__)

USER_AGENT = "circuit-proxy-probe"
PROBE_HEADER = "X-Circuit-Probe"  # names the breaker, so an upstream can tell probes apart


class Prober:
    """The probe tasks of one registry. `client` may be set after construction (the app's
    pooled client exists once it started); until then a half-open breaker is left waiting."""

    def __init__(self, registry: Registry, clock: Clock, client: UpstreamClient | None = None) -> None:
        self.registry = registry
        self.clock = clock  # the breakers' time; probes are paced on the loop's own clock
        self._client = client
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled by a reload, not yet ended
        self._wakes: dict[str, asyncio.Event] = {}
        self._running = False
        registry.add_listener(self._on_transition)

    @property
    def client(self) -> UpstreamClient | None:
        return self._client

    @client.setter
    def client(self, client: UpstreamClient | None) -> None:
        self._client = client
        self._wake_all()  # a breaker already half-open may be probed now

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """One task per probed route; needs the running loop."""
        self._running = True
        self._rescan()

    async def stop(self) -> None:
        self._running = False
        tasks, self._tasks = self._tasks, {}
        self._wakes.clear()
        for task in [*tasks.values(), *self._stopping]:
            await stop_task(task)  # a probe in flight gives its permit back (see _probe)

    def on_reload(self, settings: Settings, result: ReloadResult) -> None:
        """A reload listener: routes that gained a probe get a task, those that lost it lose it."""
        if self._running:
            self._rescan()
        self._wake_all()  # a rebuilt breaker (or a new probe spec) is read on the next turn

    def _rescan(self) -> None:
        wanted = {name for name, runtime in self.registry.routes.items()
                  if runtime.route.policy.probe is not None}
        for name in [name for name in self._tasks if name not in wanted]:
            # Cancelled, not awaited: listeners are synchronous. Its permit goes back as it ends.
            task = self._tasks.pop(name)
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
            self._wakes.pop(name, None)
        for name in wanted:
            task = self._tasks.get(name)
            if task is not None and not task.done():
                continue
            self._wakes[name] = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._run(name), name=f"probe-{name}")
            task.add_done_callback(self._ended)
            self._tasks[name] = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        # A task that died of a bug must say so now, not when it is garbage-collected; the
        # next reload starts it again.
        if not task.cancelled() and task.exception() is not None:
            log.error("probe task %s stopped", task.get_name(), exc_info=task.exception())

    def _on_transition(self, transition: Transition) -> None:
        wake = self._wakes.get(transition.breaker)
        if wake is not None:
            wake.set()

    def _wake_all(self) -> None:
        for wake in self._wakes.values():
            wake.set()

    # -- one route -------------------------------------------------------------------------------

    async def _run(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wakes[name]
        next_probe_at = 0.0  # loop time: probes are paced in real time, `interval_ms` apart
        while True:
            # Cleared before the state is read, so a transition from here on wakes the wait.
            wake.clear()
            runtime = self.registry.get(name)
            probe = runtime.route.policy.probe if runtime is not None else None
            if runtime is None or probe is None:
                await wake.wait()  # leaving the config: the reload listener cancels this task
                continue
            interval_s = probe.interval_ms / 1000
            breaker = runtime.breaker
            state = breaker.state  # applies a due open → half_open
            if state is State.OPEN:
                retry_after = breaker.retry_after()
                if retry_after is not None:
                    await _wait(wake, min(interval_s, max(retry_after, 0.001)))
                continue
            if state is not State.HALF_OPEN:
                await wake.wait()  # closed, forced, disabled: nothing to do until it opens
                continue
            now = loop.time()
            if now < next_probe_at:
                await _wait(wake, next_probe_at - now)
                continue
            if self._client is None:
                await _wait(wake, interval_s)  # the client setter wakes us
                continue
            if not await self._probe(runtime, probe):
                await _wait(wake, interval_s)  # every trial slot is taken
                continue
            next_probe_at = loop.time() + interval_s

    async def _probe(self, runtime: RouteRuntime, probe: ProbeSpec) -> bool:
        """One probe under a trial permit; False when no permit was free (nothing sent)."""
        client = self._client
        permit = runtime.breaker.try_acquire_trial()
        if permit is None or client is None:
            return False
        headers = [("User-Agent", USER_AGENT), (PROBE_HEADER, runtime.name)]
        try:
            reply = await client.call(runtime.upstream, probe.method, probe.path, headers=headers,
                                      body=b"", timeout_s=runtime.timeout_s,
                                      connect_timeout_s=runtime.connect_timeout_s)
        except BaseException:
            # Cancelled (stop, reload) or a bug in the client: the permit goes back unrecorded,
            # so the half-open slot is never lost; the exception goes on.
            runtime.release(permit)
            raise
        ok = reply.status is not None and reply.status in probe.expect_status
        runtime.record(permit, failed=not ok)
        status = reply.status if reply.status is not None else (reply.reason or "no_response")
        log.info("probe %s", "succeeded" if ok else "failed",
                 extra={"breaker": runtime.name, "status": status, "path": probe.path,
                        "to_state": runtime.breaker.state.value})
        return True


async def _wait(wake: asyncio.Event, timeout: float) -> None:
    """Until `wake` is set or `timeout` seconds have passed."""
    await wait_event(wake, timeout)
