"""Fake shop upstreams for circuit-proxy (§7): payment, inventory, notification
and shipping on their own ports, with failure modes flipped through a control API.

For tests and `circuit-proxy demo`:

    fakes = FakeUpstreams(host="127.0.0.1", base_port=0)  # 0: every port ephemeral
    await fakes.start()
    await fakes.set_mode("payment", "error", status=503)
    fakes.requests("payment"), fakes.service("payment").records
    await fakes.stop()

Nothing here imports `proxy`: the fakes stand for the world outside it.
"""

from .control import FakeUpstreams, UnknownServiceError
from .modes import Mode, ModeError, ModeSpec
from .services import SERVICE_NAMES, SKUS, Service

__all__ = [
    "SERVICE_NAMES",
    "SKUS",
    "FakeUpstreams",
    "Mode",
    "ModeError",
    "ModeSpec",
    "Service",
    "UnknownServiceError",
]
