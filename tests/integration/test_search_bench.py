"""``latentshift bench --search --random tiny-sd`` as a user runs it: its report and JSON line, on CPU."""

from __future__ import annotations

import pytest
from test_bench import bench

pytestmark = pytest.mark.integration


def test_search_bench_reports_both_loops_and_the_official_grid_cost():
    text, r = bench("--search", "--random", "tiny-sd", "--images", "2")
    assert r["shape"] == "tiny-sd" and r["images"] == 2 and r["device"].startswith("cpu")
    # the official grid's shape on a 10-step walk: skips scaled and deduplicated, all six decoder scales
    assert r["skips"] == [2, 3, 4, 5] and r["decoder_scales"] == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    assert r["candidates_per_image"] == 24
    assert r["search_candidates_per_s"] > 0 and r["official_candidates_per_s"] > 0 and r["speedup"] > 0
    # 15 trials are 15 times the one timed
    assert r["official_grid_s_per_image_official"] == pytest.approx(15 * 24 / r["official_candidates_per_s"], rel=0.02)
    assert "candidates/s" in text and "official grid" in text
