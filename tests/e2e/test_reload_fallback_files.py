"""A reload rebuilds stateless fallbacks, so an edited response file is served at once, while
the breaker (unchanged settings) keeps its state."""

from __future__ import annotations

import json

from proxy.core.clock import FakeClock

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, open_timeout_ms: 30000}
    services:
      payment:
        upstream: $payment
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: static, file: busy.json}
"""


def busy(message: str) -> str:
    return json.dumps({"status": 503, "headers": {"Content-Type": "application/json"},
                       "body": {"error": "payments_busy", "message": message}})


async def served(proxy) -> tuple[int, str, dict]:
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": 1}) as response:
        return response.status, response.headers["X-Circuit-State"], await response.json()


async def test_edited_response_file_is_served_after_reload(start_proxy, fakes, config_dir):
    files = config_dir / "fallback_responses"
    (files / "busy.json").write_text(busy("try again soon"))
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    await fakes.set_mode("payment", "error", status=500)
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": 1}) as response:
        assert response.status == 500
    assert await served(proxy) == (503, "open", {"error": "payments_busy", "message": "try again soon"})

    (files / "busy.json").write_text(busy("payments are paused"))
    async with proxy.session.post(proxy.url("/admin/reload"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        assert (response.status, response.headers["X-Reload-Kept"]) == (200, "payment.charges,payment.default")
    assert await served(proxy) == (503, "open", {"error": "payments_busy", "message": "payments are paused"})
    assert fakes.requests("payment") == 1
