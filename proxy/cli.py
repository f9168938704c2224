"""run / check / demo: arguments, exit codes, log set-up, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.config.load import ConfigError, load_settings
from proxy.config.model import Settings
from proxy.demo.catalog import DEFAULT_CONTROL_URL, SCENARIOS
from proxy.ops.logs import setup_logging

log = logging.getLogger("proxy")

DEFAULT_CONFIG = "config/breakers.yaml"
EXIT_INVALID = 2
SCENARIO_NAMES = [scenario.name for scenario in SCENARIOS]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuit-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--log-format", choices=("text", "json"))
    check = commands.add_parser("check", help="validate a config file (exit 0 valid, 2 invalid)")
    check.add_argument("path", nargs="?", default=DEFAULT_CONFIG,
                       help=f"the config to check (default: {DEFAULT_CONFIG}, as `run` reads)")
    demo = commands.add_parser("demo", help="fake upstreams + proxy on the shipped config")
    demo.add_argument("--config", default=DEFAULT_CONFIG)
    demo.add_argument("--port", type=int, help="proxy port (default: the config's, 8080)")
    demo.add_argument("--base-port", type=int, default=9100,
                      help="fake upstreams: control on this port, the four services on the next four")
    demo.add_argument("--no-traffic", action="store_true",
                      help="no built-in shop traffic: the page moves only when you send requests")
    demo.add_argument("--rate", type=float, default=4.0, help="shop traffic, requests a second (default 4)")
    demo.add_argument("--scenario", choices=SCENARIO_NAMES, help="play this scenario once the demo is up")
    scenario = commands.add_parser("scenario", help="play a demo scenario against the fake upstreams",
                                   description="Scenarios: " + "; ".join(
                                       f"{s.name}: {s.description}" for s in SCENARIOS))
    scenario.add_argument("name", nargs="?", choices=SCENARIO_NAMES, help="omit to list them")
    scenario.add_argument("--control", default=DEFAULT_CONTROL_URL,
                          help=f"the fake upstreams' control API (default {DEFAULT_CONTROL_URL})")
    return parser


def _load(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


async def serve(settings: Settings, host: str, port: int,
                before: Callable[[], Awaitable[None]] | None = None,
                adjust: Callable[[Settings], Settings] | None = None, *,
                stopping: Callable[[], Awaitable[None]] | None = None, scenarios: Any = None) -> int:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests (bounded) and free the port.

    `adjust` is what the caller did to the file's settings; a reload does it again. `stopping`
    runs when the signal comes, before the drain; `scenarios` goes to the status page (demo)."""
    # Imported here: `check` must load the config and nothing else (no aiohttp, no SQLite).
    from proxy.app import App  # noqa: PLC0415
    from proxy.http.tls import TlsError  # noqa: PLC0415
    from proxy.ops.reload import reload_on_sighup  # noqa: PLC0415

    try:
        app = App(settings, scenarios=scenarios)
    except TlsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    app.reloader.adjust = adjust
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stop_reloading = reload_on_sighup(app.reloader)
    try:
        await app.start(host, port)
        log.info("listening on http://%s:%d (%d breakers)", host, port, len(settings.routes()))
        if before is not None:
            await before()
        await stop.wait()
        if stopping is not None:
            await stopping()
        log.info("shutting down: draining in-flight requests for up to %.0f s",
                 settings.server.drain_timeout_s)
    finally:
        stop_reloading()
        # A second signal while draining must not kill the drain half-way.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, log.info, "already shutting down")
        await app.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


def _run_loop(main: Awaitable[int]) -> int:
    try:
        import uvloop  # noqa: PLC0415  (optional speed-up)
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_INVALID
    setup_logging(args.log_format or settings.server.log_format)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    return _run_loop(serve(settings, host, port))


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args.path)
    if settings is None:
        return EXIT_INVALID
    print(f"{args.path}: ok ({len(settings.services)} services, {len(settings.routes())} breakers)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_INVALID
    setup_logging(settings.server.log_format)
    # The fakes' access lines would bury the proxy's own at the shop traffic's pace.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from fake_upstreams import SERVICE_NAMES, FakeUpstreams  # noqa: PLC0415  (demo only)
    from proxy.demo.scenarios import ScenarioError, Scenarios  # noqa: PLC0415
    from proxy.demo.traffic import Traffic  # noqa: PLC0415

    try:
        host = settings.server.host
        port = settings.server.port if args.port is None else args.port
        # The shop talks to the proxy on loopback, whatever address it listens on.
        traffic = None if args.no_traffic else Traffic(f"http://127.0.0.1:{port}", rate=args.rate)
    except ValueError as exc:
        print(f"circuit-proxy demo: {exc}", file=sys.stderr)
        return EXIT_INVALID

    async def main() -> int:
        fakes = FakeUpstreams(host="127.0.0.1", base_port=args.base_port,
                              status_url=f"http://127.0.0.1:{port}/status")
        await fakes.start()
        scenarios = Scenarios(fakes.control_url, modes=fakes.describe)

        def own_fakes(loaded: Settings) -> Settings:
            """The demo's services are its own fakes, wherever they listen (also on reload)."""
            return replace(loaded, services=tuple(
                replace(service, upstream=fakes.url(service.name)) if service.name in SERVICE_NAMES
                else service for service in loaded.services))

        async def announce() -> None:
            print(f"fake upstreams: control page {fakes.control_url}/", flush=True)
            print(f"circuit-proxy: http://{host}:{port}/  (e.g. curl http://{host}:{port}/shipping/quotes)",
                  flush=True)
            if traffic is not None:
                await traffic.start()
                print(f"shop traffic: {traffic.rate:g} requests a second (checkout mix; --no-traffic: off)",
                      flush=True)
            if args.scenario:
                try:
                    await scenarios.start(args.scenario)
                except ScenarioError as exc:
                    log.warning("scenario %s not started: %s", args.scenario, exc)
            print(f"scenarios: circuit-proxy scenario NAME --control {fakes.control_url}"
                  f"  ({', '.join(SCENARIO_NAMES)}), or the buttons on the status page", flush=True)
            print(f"status page: http://127.0.0.1:{port}/status", flush=True)

        async def stop_traffic() -> None:
            if traffic is not None:
                await traffic.stop()  # before the drain: the proxy's last requests are its own
        try:
            return await serve(own_fakes(settings), host, port, before=announce, adjust=own_fakes,
                               stopping=stop_traffic, scenarios=scenarios)
        finally:
            await stop_traffic()  # also when serving failed
            await fakes.stop()

    return _run_loop(main())


def cmd_scenario(args: argparse.Namespace) -> int:
    from proxy.demo.scenarios import ScenarioError, Scenarios  # noqa: PLC0415

    scenarios = Scenarios(args.control)
    if args.name is None:
        for scenario in scenarios.available():
            print(f"{scenario['name']:<20} {scenario['title']}: {scenario['description']}")
        return 0
    try:
        asyncio.run(scenarios.start(args.name))
    except ScenarioError as exc:
        print(f"circuit-proxy scenario: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name}: started ({args.control})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo, "scenario": cmd_scenario}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
