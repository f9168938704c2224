"""The pure core: clock, breaker, windows, bulkhead, routing, headers, outcomes, templates.

Nothing here imports asyncio, aiohttp, SQLite or Prometheus, reads the time itself or does I/O."""
