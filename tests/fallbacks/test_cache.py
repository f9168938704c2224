"""proxy/fallbacks/cache.py: the bounded LRU and the "estimated availability" scaling;
proxy/fallbacks/cache_store.py: the entries written behind and restored with their true age."""

from __future__ import annotations

import json

from multidict import CIMultiDict

from proxy.config.model import FallbackSpec, Match, Policy, Route
from proxy.core.breaker import Breaker
from proxy.core.clock import FakeClock
from proxy.core.messages import Request
from proxy.core.outcome import Reason
from proxy.fallbacks.base import FallbackContext
from proxy.fallbacks.build import FallbackDeps, build_fallback
from proxy.fallbacks.cache import CacheFallback, Entry, ResponseCache, scale_document
from proxy.fallbacks.cache_store import CacheStore
from proxy.storage.sqlite import Storage


def entry(size: int) -> Entry:
    return Entry(200, (), b"x" * size, 0.0)


def test_lru_evicts_the_least_recently_used_by_count():
    cache = ResponseCache(max_entries=2, max_bytes=100)
    cache.put("a", entry(1))
    cache.put("b", entry(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", entry(1))
    assert (cache.get("a") is not None, cache.get("b"), cache.get("c") is not None) == (True, None, True)
    assert (len(cache), cache.size_bytes) == (2, 2)


def test_lru_is_bounded_in_bytes_too():
    cache = ResponseCache(max_entries=10, max_bytes=10)
    cache.put("a", entry(4))
    cache.put("b", entry(4))
    cache.put("c", entry(4))
    assert (cache.get("a"), len(cache), cache.size_bytes) == (None, 2, 8)
    cache.put("b", entry(2))  # replacing counts the new size only
    assert cache.size_bytes == 6
    cache.put("huge", entry(11))  # larger than the whole cache: not kept
    assert (cache.get("huge"), cache.size_bytes) == (None, 6)
    cache.discard("b")
    cache.discard("nothing")
    assert (len(cache), cache.size_bytes) == (1, 4)


def test_scale_floors_top_level_numbers_and_leaves_the_rest():
    scale = {"available": 0.5, "reserved": 0.25}
    assert scale_document({"sku": "A", "available": 7, "reserved": 9.9, "nested": {"available": 8}},
                          scale) == {"sku": "A", "available": 3, "reserved": 2, "nested": {"available": 8}}
    assert scale_document({"available": True, "reserved": "12"}, scale) == {"available": True, "reserved": "12"}
    assert scale_document([{"available": 3}, 4, {"sku": "B"}], scale) == [{"available": 1}, 4, {"sku": "B"}]
    assert scale_document(17, scale) == 17


def cache_fallback(clock: FakeClock, **options) -> CacheFallback:
    options = {"max_age_s": 60, "max_body_bytes": 1024, "max_entries": 10, "scale": {"available": 0.5},
               **options}
    route = Route(service="inventory", name="stock", match=Match(), policy=Policy(),
                  fallback=FallbackSpec(type="cache", options=options))
    fallback = build_fallback(route, FallbackDeps(clock=clock, fallback_dir=None))
    assert isinstance(fallback, CacheFallback)
    return fallback


def get(target: str, method: str = "GET") -> Request:
    return Request(method, target, CIMultiDict({"Host": "proxy"}))


def learn(fallback: CacheFallback, request: Request, body: bytes, **headers: str) -> bool:
    recorder = fallback.recorder(request, 200, CIMultiDict(
        {"Content-Type": "application/json", "ETag": '"v1"', "Set-Cookie": "s=1", "X-Shop": "a",
         **{k.replace("_", "-"): v for k, v in headers.items()}}))
    if recorder is None:
        return False
    for at in range(0, len(body), 3):
        recorder.feed(body[at:at + 3])
    recorder.finish()
    return True


async def test_remembered_answers_are_served_scaled_with_their_age():
    clock = FakeClock()
    fallback = cache_fallback(clock)
    assert learn(fallback, get("/inventory/stock/A%2F1?full=1"), b'{"sku": "A/1", "available": 7}')
    ctx = FallbackContext(view=Breaker("inventory.stock", Policy(), clock).view(), reason=Reason.OPEN,
                          maybe_delivered=False, body=None)
    clock.advance(30.7)
    request = get("/inventory/stock/A%2F1?full=1")
    answer = await fallback.serve(request, ctx)
    assert answer is not None
    assert (answer.status, json.loads(answer.body)) == (200, {"sku": "A/1", "available": 3})
    assert sorted(answer.headers.items()) == [("Age", "30"), ("Content-Type", "application/json"),
                                              ("X-Fallback-Estimated", "true"), ("X-Shop", "a")]
    assert request.detail == "age_s=30"
    # Keyed by the target as sent: another query, another encoding or a POST is not that entry.
    for other in (get("/inventory/stock/A%2F1"), get("/inventory/stock/A/1?full=1"),
                  get("/inventory/stock/A%2F1?full=1", "POST")):
        assert await fallback.serve(other, ctx) is None
    clock.advance(30)  # past max_age_s: dropped
    assert await fallback.serve(get("/inventory/stock/A%2F1?full=1"), ctx) is None
    assert len(fallback.cache) == 0


def test_only_storable_get_answers_are_recorded():
    fallback = cache_fallback(FakeClock(), max_body_bytes=10)
    assert not learn(fallback, get("/inventory/stock", "POST"), b"{}")
    assert not learn(fallback, get("/inventory/stock"), b"{}", Cache_Control="private, max-age=5")
    assert not learn(fallback, get("/inventory/stock"), b"{}", Content_Length="11")
    assert learn(fallback, get("/inventory/stock"), b'{"available": 100}')  # streamed past the limit
    assert len(fallback.cache) == 0


# -- surviving a restart: cache_store (real SQLite in tmp_path) ----------------------------------

async def stored_rows(storage: Storage) -> list[tuple]:
    await storage.close()  # written: every record the store queued is on disk
    await storage.open()
    return await storage.fetchall("SELECT breaker, cache_key, status, body, stored_wall FROM fallback_cache"
                                  " ORDER BY cache_key")


def persisted_fallback(clock: FakeClock, store: CacheStore, **options) -> CacheFallback:
    options = {"max_age_s": 60, "max_body_bytes": 1024, "max_entries": 10, "scale": {"available": 0.5},
               **options}
    route = Route(service="inventory", name="stock", match=Match(), policy=Policy(),
                  fallback=FallbackSpec(type="cache", options=options))
    fallback = build_fallback(route, FallbackDeps(clock=clock, fallback_dir=None, cache_store=store))
    assert isinstance(fallback, CacheFallback)
    return fallback


async def test_entries_are_written_behind_and_restored_with_their_true_age(tmp_path):
    clock = FakeClock()
    storage = Storage(tmp_path / "proxy.db")
    await storage.open()
    try:
        store = CacheStore(storage, clock)
        fallback = persisted_fallback(clock, store)
        assert learn(fallback, get("/inventory/stock/A"), b'{"sku": "A", "available": 7}')
        assert await stored_rows(storage) == []  # nothing on the request path: only marked dirty
        clock.advance(5)
        assert learn(fallback, get("/inventory/stock/B"), b'{"sku": "B", "available": 9}')
        assert store.flush() == 2
        assert store.flush() == 0  # nothing changed since
        assert await stored_rows(storage) == [
            ("inventory.stock", "/inventory/stock/A", 200, b'{"sku": "A", "available": 3}', clock.wall() - 5),
            ("inventory.stock", "/inventory/stock/B", 200, b'{"sku": "B", "available": 4}', clock.wall())]

        # The process ends; 50 s later (wall clock) another one starts on the same file.
        clock.advance(50)
        restarted_store = CacheStore(storage, clock)
        restarted = persisted_fallback(clock, restarted_store, max_age_s=54)
        assert await restarted_store.restore() == 1  # A is 55 s old: past max_age_s, dropped
        ctx = FallbackContext(view=Breaker("inventory.stock", Policy(), clock).view(), reason=Reason.OPEN,
                              maybe_delivered=False, body=None)
        assert await restarted.serve(get("/inventory/stock/A"), ctx) is None
        answer = await restarted.serve(get("/inventory/stock/B"), ctx)
        assert answer is not None
        assert (answer.status, answer.body, answer.headers["Age"], answer.headers["X-Fallback-Estimated"]) == (
            200, b'{"sku": "B", "available": 4}', "50", "true")
        assert [row[1] for row in await stored_rows(storage)] == ["/inventory/stock/B"]  # A deleted
    finally:
        await storage.close()


async def test_evicted_keys_leave_the_table_and_other_scales_are_not_restored(tmp_path):
    clock = FakeClock()
    storage = Storage(tmp_path / "proxy.db")
    await storage.open()
    try:
        store = CacheStore(storage, clock)
        fallback = persisted_fallback(clock, store, max_entries=2)
        for sku in ("A", "B", "C"):  # A is evicted by C
            learn(fallback, get(f"/inventory/stock/{sku}"), b'{"available": 8}')
        store.flush()
        assert [row[1] for row in await stored_rows(storage)] == ["/inventory/stock/B", "/inventory/stock/C"]
        fallback.cache.discard("/inventory/stock/B")
        store.flush()
        assert [row[1] for row in await stored_rows(storage)] == ["/inventory/stock/C"]

        # Scaled by 0.5 then; by 0.25 now: serving it would show the wrong estimate.
        other = CacheStore(storage, clock)
        rescaled = persisted_fallback(clock, other, scale={"available": 0.25})
        assert (await other.restore(), len(rescaled.cache)) == (0, 0)
        assert await stored_rows(storage) == []
    finally:
        await storage.close()


async def test_restore_keeps_no_more_than_max_entries_the_newest_first(tmp_path):
    clock = FakeClock()
    storage = Storage(tmp_path / "proxy.db")
    await storage.open()
    try:
        store = CacheStore(storage, clock)
        fallback = persisted_fallback(clock, store, max_entries=3)
        for sku in ("A", "B", "C"):
            learn(fallback, get(f"/inventory/stock/{sku}"), b'{"available": 8}')
            clock.advance(1)
        store.flush()
        assert len(await stored_rows(storage)) == 3
        smaller = CacheStore(storage, clock)
        restarted = persisted_fallback(clock, smaller, max_entries=2)
        assert await smaller.restore() == 2
        assert [key for key, _ in restarted.cache.items()] == ["/inventory/stock/B", "/inventory/stock/C"]
        assert [row[1] for row in await stored_rows(storage)] == ["/inventory/stock/B", "/inventory/stock/C"]
    finally:
        await storage.close()


def test_a_route_rebuilt_by_a_reload_keeps_what_its_cache_learnt_unless_the_scale_changed():
    clock = FakeClock()
    store = CacheStore(Storage(":memory:"), clock)
    before = persisted_fallback(clock, store)
    learn(before, get("/inventory/stock/A"), b'{"available": 8}')
    longer = persisted_fallback(clock, store, max_age_s=600)  # another max_age_s: rebuilt
    assert [(key, entry.body) for key, entry in longer.cache.items()] == [("/inventory/stock/A", b'{"available": 4}')]
    rescaled = persisted_fallback(clock, store, scale={"available": 0.25})
    assert len(rescaled.cache) == 0  # its estimates would be wrong
