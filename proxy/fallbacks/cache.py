"""`cache`: the last-known-good answer while the upstream is away (§5, RFC 5861 stale-if-error).

Successful GET responses of the route are remembered per method + path + query in a bounded
LRU (entries and bytes); while the breaker rejects calls (or a let-through call fails) the
entry is served with `Age` and `X-Fallback-Estimated: true`, its top-level numeric JSON fields
named in `scale` multiplied and floored (inventory "estimated availability": never oversell).
Scaling happens once, when the response is remembered, so serving is a dictionary lookup.
Nothing here touches the disk: a changed key is only marked dirty, and `cache_store` writes it
behind (and puts it back at start-up, with its true age), so the cache survives a restart.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.config.model import Route
from proxy.core.headers import HOP_BY_HOP
from proxy.core.messages import Answer, Request
from proxy.fallbacks.base import FallbackContext
from proxy.fallbacks.static import Canned, load_spec

if TYPE_CHECKING:
    from proxy.fallbacks.build import FallbackDeps

log = logging.getLogger(__name__)

# Not replayed from the cache: framing, another client's cookies, the upstream's own clock.
_NOT_KEPT = HOP_BY_HOP | {"content-length", "set-cookie", "date", "age"}
# No longer true of a body the cache changed.
_NOT_KEPT_SCALED = _NOT_KEPT | {"etag", "content-md5", "digest", "content-encoding"}
_ESTIMATED = ("X-Fallback-Estimated", "true")


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float  # clock.monotonic()


def scale_document(document: Any, scale: dict[str, float]) -> Any:
    """Top-level numeric fields multiplied and floored; a list of objects field by field."""
    if isinstance(document, list):
        return [scale_document(item, scale) if isinstance(item, dict) else item for item in document]
    if not isinstance(document, dict):
        return document
    scaled = dict(document)
    for field, factor in scale.items():
        value = scaled.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scaled[field] = math.floor(value * factor)
    return scaled


class ResponseCache:
    """method + path + query → Entry: O(1) lookups, LRU over `max_entries` and `max_bytes`.

    With `track=True` every key that was put, evicted or discarded is kept in a dirty set until
    `take_dirty` (the write-behind of `cache_store`); nothing else is done on the request path."""

    __slots__ = ("_dirty", "_entries", "max_bytes", "max_entries", "size_bytes")

    def __init__(self, max_entries: int, max_bytes: int, *, track: bool = False) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._dirty: set[str] | None = set() if track else None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: str) -> Entry | None:
        """The entry without making it the most recent (writing it is not using it)."""
        return self._entries.get(key)

    def contains(self, key: str) -> bool:
        return key in self._entries

    def items(self) -> list[tuple[str, Entry]]:
        """Least recently used first."""
        return list(self._entries.items())

    def put(self, key: str, entry: Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size_bytes -= len(old.body)
        self.mark_dirty(key)
        if len(entry.body) > self.max_bytes:
            return
        self._entries[key] = entry
        self.size_bytes += len(entry.body)
        while len(self._entries) > self.max_entries or self.size_bytes > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.size_bytes -= len(evicted.body)
            self.mark_dirty(evicted_key)

    def discard(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size_bytes -= len(old.body)
            self.mark_dirty(key)

    def mark_dirty(self, key: str) -> None:
        if self._dirty is not None:
            self._dirty.add(key)

    def take_dirty(self) -> set[str]:
        """Keys changed since the last call (empty when not tracking)."""
        dirty = self._dirty
        if not dirty:
            return set()
        self._dirty = set()
        return dirty


class _Recording:
    """Collects one successful response's body as it streams to the client."""

    __slots__ = ("_chunks", "_fallback", "_headers", "_key", "_size", "_status")

    def __init__(self, fallback: CacheFallback, key: str, status: int, headers: CIMultiDict[str]) -> None:
        self._fallback = fallback
        self._key = key
        self._status = status
        self._headers = headers
        self._chunks: list[bytes] | None = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._chunks is None:
            return
        self._size += len(chunk)
        if self._size > self._fallback.max_body_bytes:
            self._chunks = None  # too large to remember; the previous entry stays
            return
        self._chunks.append(chunk)

    def finish(self) -> None:
        if self._chunks is not None:
            self._fallback.remember(self._key, self._status, self._headers, b"".join(self._chunks))


class CacheFallback:
    type = "cache"
    buffer_request_bytes = 0

    def __init__(self, route: Route, deps: FallbackDeps) -> None:
        spec = route.fallback
        assert spec is not None
        options = spec.options
        self.on_failure = spec.on_failure
        self.name = route.breaker_name
        self.max_age_s = float(options["max_age_s"])
        self.max_body_bytes = int(options["max_body_bytes"])
        self.scale: dict[str, float] = dict(options.get("scale") or {})
        store = deps.cache_store
        self.cache = ResponseCache(int(options["max_entries"]), int(options.get("max_bytes") or 64 << 20),
                                   track=store is not None)
        self._clock = deps.clock
        default = options.get("default_file")
        self.default = Canned(load_spec(deps, route, default), deps.clock) if default else None
        if store is not None:
            store.register(self)

    # -- learning (successful calls) -----------------------------------------------------------

    def recorder(self, request: Request, status: int, headers: CIMultiDict[str]) -> _Recording | None:
        if request.method != "GET":
            return None  # only safe, repeatable requests are answered from memory
        cache_control = headers.get("Cache-Control", "").lower()
        if "no-store" in cache_control or "private" in cache_control:
            return None
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        # Keyed by the target as sent (path and query, percent-encoding kept).
        return _Recording(self, request.target, status, headers)

    def remember(self, key: str, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        dropped = _NOT_KEPT
        if self.scale:
            scaled = self._scaled(headers, body)
            if scaled is None:
                # Unscaled numbers could oversell; better no estimate than a wrong one.
                log.debug("cache %s: %s not remembered: cannot apply scale", self.name, key)
                self.cache.discard(key)
                return
            body, dropped = scaled, _NOT_KEPT_SCALED
        kept = tuple((name, value) for name, value in headers.items() if name.lower() not in dropped)
        self.cache.put(key, Entry(status, kept, body, self._clock.monotonic()))

    def restore(self, key: str, status: int, headers: tuple[tuple[str, str], ...], body: bytes,
                stored_at: float) -> None:
        """An entry read back at start-up, as it was remembered (already scaled)."""
        self.cache.put(key, Entry(status, headers, body, stored_at))

    @staticmethod
    def _is_json(headers: CIMultiDict[str]) -> bool:
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        return content_type == "application/json" or content_type.endswith("+json")

    def _scaled(self, headers: CIMultiDict[str], body: bytes) -> bytes | None:
        if headers.get("Content-Encoding", "identity").lower() != "identity" or not self._is_json(headers):
            return None
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return json.dumps(scale_document(document, self.scale)).encode()

    # -- serving (breaker open, or the call failed) --------------------------------------------

    async def serve(self, request: Request, ctx: FallbackContext) -> Answer | None:
        key = request.target
        entry = self.cache.get(key) if request.method == "GET" else None
        if entry is not None:
            age = self._clock.monotonic() - entry.stored_at
            if age <= self.max_age_s:
                headers = CIMultiDict(entry.headers)
                age_s = str(max(0, int(age)))
                headers["Age"] = age_s
                headers[_ESTIMATED[0]] = _ESTIMATED[1]
                request.detail = f"age_s={age_s}"
                return Answer(entry.status, entry.body, headers)
            self.cache.discard(key)  # too old to stand for the upstream's answer
        if self.default is not None:
            request.detail = "default_file"
            return await self.default.render(request, ctx, (_ESTIMATED,))
        return None
