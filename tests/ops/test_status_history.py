"""The charts' history (proxy.ops.history): 10-s buckets of outcomes and latency, sampled by the
ticker, and rebuilt from stored snapshots. A real Registry and Metrics on a FakeClock."""

from __future__ import annotations

from pathlib import Path

from proxy.config.load import load_settings
from proxy.core.clock import FakeClock
from proxy.ops.history import KEPT, History
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry

CONFIG = """
storage: {path: var/db.sqlite}
defaults: {failure_threshold: 0, failure_rate_threshold: 0}
services:
  payment:
    upstream: http://127.0.0.1:9
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""
START = 1_700_000_000.0  # a multiple of 10: buckets start on it


def build(tmp_path: Path) -> tuple[History, Registry, FakeClock]:
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(CONFIG)
    clock = FakeClock(start_wall=START)
    metrics = Metrics()
    registry = Registry(load_settings(path, {}), clock, metrics)
    return History(registry, metrics), registry, clock


def call(registry: Registry, clock: FakeClock, seconds: float, *, failed: bool = False) -> None:
    runtime = registry.get("payment.charges")
    permit = runtime.breaker.try_acquire()
    clock.advance(seconds)
    runtime.record(permit, failed=failed)


def test_each_tick_adds_what_happened_since_the_last_into_the_bucket_under_way(tmp_path):
    history, registry, clock = build(tmp_path)
    history.sample(clock.wall())  # the first reading: nothing yet
    for _ in range(18):
        call(registry, clock, 0.004)
    for _ in range(2):
        call(registry, clock, 0.4, failed=True)
    registry.get("payment.charges").breaker.note_rejected()
    history.sample(START + 5)
    [bucket] = history.series("payment.charges")
    assert bucket[:5] == [START, 18, 2, 1, 0]
    assert 2.5 <= bucket[5] <= 5 and 250 <= bucket[6] <= 500  # ms, within the histogram's buckets

    # The next bucket counts only its own calls, and its latency only theirs.
    call(registry, clock, 0.02)
    history.sample(START + 12)
    assert [b[:5] for b in history.series("payment.charges")] == [[START, 18, 2, 1, 0], [START + 10, 1, 0, 0, 0]]
    assert 10 <= history.series("payment.charges")[-1][6] <= 25
    assert len(history.series("payment.charges", 1)) == 1

    # A reset starts the breaker's counts from zero: counted as new, never negative.
    registry.get("payment.charges").breaker.reset()
    call(registry, clock, 0.001)
    history.sample(START + 14)
    assert history.series("payment.charges")[-1][1:4] == [2, 0, 0]


def test_stored_snapshots_become_buckets_and_a_restart_in_between_is_no_negative_count(tmp_path):
    history, _, _ = build(tmp_path)
    rows = [  # (breaker, at_wall, success, failure, rejected, p50 s, p95 s), as persistence reads them
        ("payment.charges", START - 30, 10, 0, 0, 0.002, 0.004),  # the baseline
        ("payment.charges", START - 21, 15, 1, 0, 0.003, 0.010),
        ("payment.charges", START - 20, 18, 1, 2, 0.001, 0.020),  # ends the same bucket
        ("payment.charges", START - 5, 3, 0, 0, None, None),  # a restart: counted from zero again
        ("inventory.stock", START - 5, 1, 1, 1, None, None),  # no longer in the config
    ]
    assert history.restore(rows) == 2
    assert history.series("payment.charges") == [
        [START - 30, 8, 1, 2, None, 3.0, 20.0],
        [START - 10, 3, 0, 0, None, None, None]]
    assert history.series("inventory.stock") == []
    # More than the page shows: the newest KEPT buckets stay.
    (tmp_path / "more").mkdir()
    more, _, _ = build(tmp_path / "more")
    assert more.restore([("payment.charges", START - 10 * i, i, 0, 0, None, None)
                         for i in range(KEPT + 20, 0, -1)]) == KEPT
    kept = more.series("payment.charges")
    assert (len(kept), kept[0][0], kept[-1][0]) == (KEPT, START - 10 * (KEPT + 1), START - 20)
