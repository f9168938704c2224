"""Small helpers for the proxy's background tasks (tickers, writers, webhook workers)."""

from __future__ import annotations

import asyncio


async def stop_task(task: asyncio.Task[object]) -> None:
    """Cancel `task` and wait for it; our own cancellation still propagates."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves, not just the task


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Until `event` is set (True) or `timeout` seconds have passed (False).

    `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11 a `wait_for` whose event is
    set just as the task is cancelled returns normally and the cancellation is lost, so a
    loop around it never stops (seen as a worker that outlived its `stop_task`)."""
    if timeout is None:
        await event.wait()
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
