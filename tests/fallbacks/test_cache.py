"""proxy/fallbacks/cache.py: the bounded LRU and the "estimated availability" scaling."""

from __future__ import annotations

from proxy.fallbacks.cache import Entry, ResponseCache, scale_document


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
