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
