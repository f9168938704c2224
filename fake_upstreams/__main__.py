"""`python -m fake_upstreams [--host H] [--base-port 9100]` (§1, §7).

Starts the control server on the base port and payment, inventory, notification,
shipping on the next four, prints their addresses, and runs until SIGINT or SIGTERM;
then closes every port and exits 0. A port that cannot be opened exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .control import FakeUpstreams
from .page import DEFAULT_STATUS_URL

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fake_upstreams",
        description="Fake shop upstreams with failure modes, for circuit-proxy.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--base-port", type=int, default=9100,
        help="control port; the services take the next four (default 9100, 0 = ephemeral)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--status-url", default=DEFAULT_STATUS_URL,
                        help=f"the proxy's status page, linked from the control page (default {DEFAULT_STATUS_URL})")
    args = parser.parse_args(argv)
    if not 0 <= args.base_port <= 65535 - 4:
        parser.error(f"--base-port must be from 0 to 65531, got {args.base_port}")
    return args


async def serve(host: str, base_port: int, status_url: str = DEFAULT_STATUS_URL) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    fakes = FakeUpstreams(host=host, base_port=base_port, status_url=status_url)
    try:
        await fakes.start()
    except OSError as exc:
        message = f"fake_upstreams: cannot listen on {host} from port {base_port}: {exc}"
        print(message, file=sys.stderr)
        return 1
    try:
        for name, url in fakes.addresses().items():
            print(f"{name:<13} {url}", flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await fakes.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(serve(args.host, args.base_port, args.status_url))


if __name__ == "__main__":
    sys.exit(main())
