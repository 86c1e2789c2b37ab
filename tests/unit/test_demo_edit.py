"""The demo's h-space edit part without Ray: its generated sets and its figures by the shape metric."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.demo import edit as demo
from pipeline.demo.common import demo_config_dir
from pipeline.demo.shapes import ALIGNED_SIDE, SIZE, render
from pipeline.metrics.shapes import measure_shapes


def test_sides_narrow_the_size_and_leave_the_default_draws_alone():
    small, meta = render("discs", 200, seed=2, aligned=True, sides=demo.EDIT_SETS["small"])
    sides = np.array([m["box"][2] for m in meta])
    assert set(sides) == {12, 13, 14}
    assert all(m["box"][0] == m["box"][1] == (SIZE - m["box"][2]) // 2 for m in meta)  # centred
    assert (measure_shapes(small)["label"] == "discs").all()
    # without sides: the trained default and the 20 px aligned box, as before
    plain, plain_meta = render("discs", 200, seed=2)
    assert {m["box"][2] for m in plain_meta} > {12, 24}
    aligned, aligned_meta = render("discs", 200, seed=2, aligned=True)
    assert all(m["box"] == [6, 6, ALIGNED_SIDE, ALIGNED_SIDE] for m in aligned_meta)
    assert [m["hue"] for m in aligned_meta] == [m["hue"] for m in plain_meta]
    with pytest.raises(ValueError, match="trained range"):
        render("discs", 4, sides=(8, 14))


def test_edit_metrics_measure_the_size_toward_set_b_and_what_stays():
    a, _ = render("discs", 16, seed=2, aligned=True, sides=(12, 14))
    b, _ = render("discs", 16, seed=3, aligned=True, sides=(22, 24))
    inputs, meta = render("discs", 8, seed=4, aligned=True, sides=(12, 12))
    same_colour = [render("discs", 8, seed=4, aligned=True, sides=(s, s))[0] for s in (12, 17, 22)]
    squares, _ = render("squares", 8, seed=4, aligned=True, sides=(17, 17))
    m = demo.edit_metrics(inputs, {0.0: same_colour[0], 1.0: same_colour[1], 2.0: same_colour[2], 3.0: squares}, a, b)
    assert m["input_mean_side_px"] == 12 and m["set_a"]["count"] == 16 and m["set_b"]["mean_side_px"] > 21
    s = m["scales"]
    assert [s[k]["mean_side_px"] for k in (0.0, 1.0, 2.0)] == [12, 17, 22]
    assert s[0.0]["toward_b"] == 0 and 0.4 < s[1.0]["toward_b"] < 0.6 and s[2.0]["toward_b"] > 0.9
    assert s[1.0]["kind_kept_rate"] == 1 and s[3.0]["kind_kept_rate"] == 0 and s[3.0]["labels"] == {"squares": 8}
    assert s[0.0]["mean_centroid_shift_px"] == 0 and s[1.0]["mean_centroid_shift_px"] < 1  # grown in place
    assert s[2.0]["median_hue_error_deg"] < 1  # the same colours
    assert not m["grows_with_scale"]  # the squares at scale 3 are no larger than the scale-2 discs
    grows = demo.edit_metrics(inputs, {0.0: same_colour[0], 1.0: same_colour[1]}, a, b)
    assert grows["grows_with_scale"]


def test_edit_table_lines():
    a, _ = render("discs", 4, seed=2, aligned=True, sides=(12, 14))
    b, _ = render("discs", 4, seed=3, aligned=True, sides=(22, 24))
    m = demo.edit_metrics(a, {0.0: a, 1.0: b}, a, b)
    row = {**m, "sets": {"a": "small", "b": "large"}, "t0": 950, "steps": 20, "t_edit": 700, "t_boost": 0}
    lines = "\n".join(demo.edit_lines(row))
    assert "4 small discs (set A" in lines and "4 large (set B" in lines and "t_edit 700, t_boost 0" in lines
    assert "scale 1" in lines and "100%" in lines and "the size grows with the scale: yes" in lines


def test_edit_config_is_what_the_demo_part_needs():
    cfg = load_config(demo_config_dir() / "edit.yaml")
    h = cfg.hspace
    assert cfg.source.model == "bundled:discs" and h.method == "mean-difference" and cfg.sampler.clip_x0 == "off"
    assert h.scales[0] == 0 and h.scales == sorted(h.scales) and isinstance(h.t_edit, int) and h.t_boost == 0
    assert cfg.output.latents == "none"
