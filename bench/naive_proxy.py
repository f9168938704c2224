"""The baseline: the reverse proxy a user would write by hand with aiohttp.

    python -m bench.naive_proxy --port 0 --upstream http://127.0.0.1:9000 [--timeout 5] [--no-uvloop]

One `web.Application`, one shared `ClientSession`, bodies streamed both ways, hop-by-hop
headers dropped, 502/504 when the upstream cannot answer. No breaker, no metrics: it is
what circuit-proxy has to beat. It prints "ready <port>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import ClientConnectorError, ClientError, ClientSession, ClientTimeout, TCPConnector, web

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
              "upgrade", "host", "content-length"}


def build(upstream: str, timeout_s: float) -> web.Application:
    app = web.Application()
    timeout = ClientTimeout(total=timeout_s)

    async def session_ctx(app: web.Application):
        app["session"] = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False)
        yield
        await app["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with app["session"].request(
                    request.method, upstream + request.path_qs, headers=headers,
                    data=request.content if request.body_exists else None,
                    allow_redirects=False, timeout=timeout) as upstream_response:
                response = web.StreamResponse(status=upstream_response.status, headers={
                    k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP})
                if upstream_response.content_length is not None:
                    response.content_length = upstream_response.content_length
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except ClientConnectorError:
            return web.json_response({"error": "upstream_unreachable"}, status=502)
        except asyncio.TimeoutError:
            return web.json_response({"error": "upstream_timeout"}, status=504)
        except ClientError:
            return web.json_response({"error": "upstream_error"}, status=502)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def main(host: str, port: int, upstream: str, timeout_s: float) -> None:
    runner = web.AppRunner(build(upstream, timeout_s), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    print(f"ready {site._server.sockets[0].getsockname()[1]}", flush=True)  # noqa: SLF001
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop  # noqa: PLC0415
            runner = uvloop.run
        except ImportError:
            pass
    try:
        runner(main(args.host, args.port, args.upstream.rstrip("/"), args.timeout))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
