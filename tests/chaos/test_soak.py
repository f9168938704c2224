"""The soak in miniature (RELIABILITY.md, "Soak"): `tests.chaos.soak` for ~36 s in the default
run, with the proxy and the fakes as real processes; the long one is
`python -m tests.chaos.soak --minutes N`."""

from __future__ import annotations

import pytest

from tests.chaos.soak import run_soak

DURATION_S = 36  # 11 s warm-up, then chaos / healthy halves of 15 s (two patterns)


@pytest.mark.timeout(150)
async def test_short_soak_with_flapping_upstreams(tmp_path):
    report = await run_soak(DURATION_S, tmp_path, rate=15, cycle_s=15, sample_s=1.0, settle_s=30)
    print((tmp_path / "report.md").read_text())
    load = report["load"]
    assert load["requests"] >= 0.9 * DURATION_S * 15 * 4
    assert all(v["accepted"] > 0 for v in report["queues"].values()), report["queues"]
    assert not report["problems"], "\n".join(report["problems"])
