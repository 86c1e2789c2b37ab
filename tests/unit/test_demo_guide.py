"""The demo's guide part without Ray: its figures by the shape metric on images painted by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.demo import common
from pipeline.demo import guide as demo
from pipeline.demo.shapes import shape_masks

GREEN = 120.0


def paint(items: list[tuple[str, tuple[int, int, int]]], side: int = 16) -> np.ndarray:
    """One 32×32 image per (shape, RGB): the shape in a centred ``side`` px box on black; shape None: all black."""
    n = len(items)
    out = np.zeros((n, 32, 32, 3), np.uint8)
    box = np.full(n, side), np.full(n, (32 - side) / 2), np.full(n, (32 - side) / 2)
    for i, (shape, rgb) in enumerate(items):
        if shape is not None:
            out[i][shape_masks(shape, *box)[i]] = rgb
    return out


# hues by hand (HSV hue of a pure colour): red 0°, yellow 60°, green 120°, blue 240°, magenta 300°;
# (64, 255, 0): max G, so 60·(2 + (B − R)/(max − min)) = 60·(2 − 64/255) = 104.94°, 15.06° from green
UNGUIDED = [("discs", (255, 0, 0)), ("discs", (0, 0, 255)), ("discs", (255, 255, 0)), (None, (0, 0, 0))]
GUIDED = [("discs", (0, 255, 0)), ("discs", (64, 255, 0)), ("discs", (255, 0, 255)), ("squares", (0, 255, 0))]
NEAR = 60 * 64 / 255  # 15.06°


def test_guide_metrics_hue_error_to_the_target_and_the_shape_kept():
    m = demo.guide_metrics(paint(UNGUIDED), paint(GUIDED), GREEN)
    u, g = m["unguided"], m["guided"]
    # unguided: errors 120, 120, 60 over the 3 lit images; the black one is not lit, so it has no hue
    # and does not count as within 30° either
    assert u["count"] == 4 and u["labels"] == {"discs": 3, "none": 1}
    assert u["median_hue_error_deg"] == pytest.approx(120, abs=0.01)
    assert u["mean_hue_error_deg"] == pytest.approx(100, abs=0.01)
    assert u["within_rate"] == 0 and u["disc_rate"] == 0.75 and u["mean_side_px"] == 16
    # guided: errors 0, 15.06, 180, 0; the square is on target but is not a disc (the shape not kept)
    assert g["median_hue_error_deg"] == pytest.approx(NEAR / 2, abs=0.01)
    assert g["mean_hue_error_deg"] == pytest.approx((NEAR + 180) / 4, abs=0.01)
    assert g["within_rate"] == 0.75 and g["disc_rate"] == 0.75 and g["labels"] == {"discs": 3, "squares": 1}
    # pairs lit in both: the first three seeds; drops 120, 120 − 15.06, −120: the third went the wrong way
    assert m["pairs"] == 3 and m["closer_rate"] == pytest.approx(2 / 3)
    assert m["mean_hue_error_drop_deg"] == pytest.approx((120 - NEAR) / 3, abs=0.01)
    assert m["target_hue_deg"] == GREEN and m["within_deg"] == demo.GUIDE_WITHIN_DEG
    tight = demo.guide_metrics(paint(UNGUIDED), paint(GUIDED), GREEN, within_deg=10)
    assert tight["guided"]["within_rate"] == 0.5  # 15.06° is out at 10°
    # the hue error is circular: red is 120° from green whichever way round, and 0° from 359°
    red = demo.guide_metrics(paint(GUIDED[:1]), paint([("discs", (255, 0, 0))]), 359)
    assert red["guided"]["median_hue_error_deg"] == pytest.approx(1, abs=0.01)


def test_guide_metrics_with_nothing_lit_say_so():
    black = paint([(None, (0, 0, 0))] * 2)
    m = demo.guide_metrics(black, black, GREEN)
    assert m["pairs"] == 0 and m["closer_rate"] is None and m["mean_hue_error_drop_deg"] is None
    assert m["guided"]["median_hue_error_deg"] is None and m["guided"]["within_rate"] == 0
    assert m["guided"]["disc_rate"] == 0 and m["guided"]["labels"] == {"none": 2}


def test_guide_table_lines():
    m = demo.guide_metrics(paint(UNGUIDED), paint(GUIDED), GREEN)
    row = {**m, "energy": "hue", "weight": 100.0, "step_size": 0.05, "langevin_steps": 50, "steps": 10, "eta": 1.0,
           "clip_x0": "auto", "targets": {"within_rate": 0.8, "disc_rate": 0.5},
           "target_met": {"within_rate": False, "disc_rate": True}, "seconds": 12.5}
    lines = "\n".join(demo.guide_lines(row))
    assert "hue energy toward 120° (12.5 s)" in lines and "λ 100, s 0.05, 50 Langevin steps, 10-step" in lines
    assert "4 seeds" in lines and "within 30°" in lines and "7.53°" in lines
    assert "guided within 30° 75.0% (target ≥ 80%) NOT met; discs 75.0% (target ≥ 50%) met" in lines
    assert "closer to the target than unguided on 67% of 3 seeds" in lines


def test_guide_config_is_what_the_demo_part_needs():
    cfg = load_config(common.demo_config_dir() / "guide.yaml")
    g = cfg.guide
    assert cfg.source.model == "bundled:discs" and g.energy == "hue" and g.weight > 0 and g.langevin_steps > 0
    assert cfg.sampler.eta > 0 and cfg.output.latents == "none"  # guide walks the stochastic decoder
    assert common.TARGETS["guide_within_rate"] <= 1 and common.TARGETS["guide_disc_rate"] <= 1
