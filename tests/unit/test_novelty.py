"""Nearest-neighbour novelty of synthesized images against their OOD inputs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics.novelty import (
    leave_one_out_distance,
    nearest_input_distance,
    novelty,
    summarize,
)


def brute_rms(a: np.ndarray, b: np.ndarray) -> float:
    """The definition, one pair at a time: RMS pixel difference with pixels in [0, 1]."""
    d = a.astype(np.float64) / 255 - b.astype(np.float64) / 255
    return float(np.sqrt((d**2).mean()))


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8), rng.integers(0, 256, (5, 4, 5, 3), dtype=np.uint8)


def test_nearest_input_distance_matches_brute_force(images):
    synth, inputs = images
    dist, nearest = nearest_input_distance(synth, inputs, batch=3)  # batches of 3 over 7 images
    for i, s in enumerate(synth):
        direct = [brute_rms(s, x) for x in inputs]
        assert dist[i] == pytest.approx(min(direct), rel=1e-12)
        assert nearest[i] == int(np.argmin(direct))


def test_leave_one_out_matches_brute_force(images):
    _, inputs = images
    own = leave_one_out_distance(inputs, batch=2)
    for i, x in enumerate(inputs):
        assert own[i] == pytest.approx(min(brute_rms(x, y) for j, y in enumerate(inputs) if j != i), rel=1e-12)


def test_exact_copies_measure_zero_and_are_not_novel(images):
    synth, inputs = images
    mixed = np.concatenate([inputs[[3, 0]], synth])
    result = novelty(mixed, inputs)
    assert result["distance"][0] == 0.0 and result["distance"][1] == 0.0  # exactly, not about
    assert list(result["nearest"][:2]) == [3, 0]
    assert not result["novel"][:2].any()
    own = leave_one_out_distance(inputs)
    assert result["threshold"] == pytest.approx(0.5 * np.median(own))
    assert (result["novel"] == (result["distance"] >= result["threshold"])).all()


def test_a_far_image_is_novel_and_a_slightly_changed_copy_is_not():
    inputs = np.zeros((4, 8, 8, 3), np.uint8)
    for i in range(4):
        inputs[i, i * 2 : i * 2 + 2] = 200  # four different bars
    near = inputs[:1].copy()
    near[0, 0, 0, 0] = 190  # one channel of one pixel off
    far = np.full((1, 8, 8, 3), 255, np.uint8)
    result = novelty(np.concatenate([near, far]), inputs)
    assert list(result["novel"]) == [False, True]


def test_summary_quantiles():
    s = summarize(np.arange(11, dtype=float))
    assert s["count"] == 11 and s["q50"] == 5 and s["q10"] == 1 and s["q90"] == 9
    assert s["min"] == 0 and s["max"] == 10 and s["mean"] == 5
    assert summarize(np.zeros(0)) == {"count": 0}


def test_needs_uint8_and_two_inputs(images):
    synth, inputs = images
    with pytest.raises(TypeError):
        nearest_input_distance(synth.astype(np.float32), inputs)
    with pytest.raises(ValueError):
        leave_one_out_distance(inputs[:1])
