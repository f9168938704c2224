"""Every contract error body (§4) and its headers.

Bodies are small JSON documents; the ones that do not depend on the request are built once.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

_JSON = "application/json"


def json_response(status: int, document: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(document).encode(), content_type=_JSON,
                        headers=headers)


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up, at least 1 (§4)."""
    return str(max(1, math.ceil(seconds)))


def circuit_open(breaker: str, retry_after: float | None) -> web.Response:
    """503 for a call the breaker rejected; no Retry-After while forced open."""
    document = {"error": "circuit_open", "breaker": breaker,
                "retry_after": None if retry_after is None else round(max(0.0, retry_after), 3)}
    headers = None if retry_after is None else {"Retry-After": retry_after_header(retry_after)}
    return json_response(503, document, headers)


def bulkhead_full(breaker: str) -> web.Response:
    return json_response(503, {"error": "bulkhead_full", "breaker": breaker}, {"Retry-After": "1"})


def upstream_unreachable(breaker: str, detail: str) -> web.Response:
    return json_response(502, {"error": "upstream_unreachable", "breaker": breaker, "detail": detail})


def upstream_timeout(breaker: str, timeout_s: float) -> web.Response:
    return json_response(504, {"error": "upstream_timeout", "breaker": breaker, "timeout_s": timeout_s})


def unknown_service(service: str) -> web.Response:
    return json_response(404, {"error": "unknown_service", "service": service})


def bad_request(reason: str) -> web.Response:
    return json_response(400, {"error": "bad_request", "detail": reason})


def payload_too_large(limit: int) -> web.Response:
    return json_response(413, {"error": "payload_too_large", "max_body_bytes": limit})


def headers_too_large(limit: int) -> web.Response:
    return json_response(431, {"error": "request_header_fields_too_large", "max_header_bytes": limit})
