"""How the control plane reads a request path: percent-decoded as aiohttp's router read it.

The reserved paths were aiohttp routes, and clients (the status page, scripts, monitoring)
rely on how they matched: routes match the path decoded except for `%2F` and `%25`, so an
encoded slash stays inside one segment; a path parameter is then decoded in full; and the
`path` a 404 document echoes is the whole path decoded. Pure string work: no I/O.
"""

from __future__ import annotations

import re

_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_KEPT = re.compile(r"%2[Ff]|%25")  # what a route match keeps encoded


def _decode_run(match: re.Match[str]) -> str:
    raw = bytes.fromhex(match.group().replace("%", ""))
    # Bytes that are not UTF-8 stay escaped, as yarl leaves them, rather than becoming U+FFFD.
    text = raw.decode("utf-8", "surrogateescape")
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in text)


def unquote(text: str) -> str:
    """Every escape decoded (aiohttp's `request.path`, a path parameter's value)."""
    return _ESCAPES.sub(_decode_run, text) if "%" in text else text


def route_path(raw_path: str) -> str:
    """What routes are matched against: decoded, but `%2F` and `%25` kept (aiohttp's path_safe)."""
    if "%" not in raw_path:
        return raw_path
    pieces = _KEPT.split(raw_path)
    kept = [escape.upper() for escape in _KEPT.findall(raw_path)]
    out = [unquote(pieces[0])]
    for escape, piece in zip(kept, pieces[1:]):
        out.append(escape)
        out.append(unquote(piece))
    return "".join(out)
