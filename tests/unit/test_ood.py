"""OOD Gaussian maths against numpy and the high-dimensional closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.diffusion.ood import (
    MomentFit,
    Reservoir,
    draw_candidates,
    fit_moments,
    measure_geometry,
    point_geometry,
    sample_latents,
    separability,
    within_tolerance,
)


def data(n=300, d=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(3.0, 2.0, (n, d)) * rng.uniform(0.5, 2.0, d) + 1e4  # large offset: cancellation-prone


@pytest.mark.parametrize("splits", [[300], [1] * 300, [7, 100, 1, 192], [150, 150]])
def test_moments_equal_numpy_whatever_the_batching(splits):
    x = data()
    batches = np.split(x, np.cumsum(splits)[:-1])
    fit = fit_moments(torch.from_numpy(b) for b in batches)
    assert fit.count == 300
    np.testing.assert_allclose(fit.mean.numpy(), x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(fit.variance("diagonal").numpy(), x.var(0), rtol=1e-9)
    assert fit.variance("isotropic").item() == pytest.approx(x.var(0).mean(), rel=1e-9)


def test_merging_across_actors_is_associative():
    x = torch.from_numpy(data(seed=1))
    a, b, c = MomentFit.of(x[:50]), MomentFit.of(x[50:170]), MomentFit.of(x[170:])
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    assert left.count == right.count == 300
    assert torch.allclose(left.mean, right.mean, rtol=1e-12) and torch.allclose(left.m2, right.m2, rtol=1e-12)
    assert MomentFit().merge(a) is a and a.merge(MomentFit()) is a


def test_float32_inputs_are_accumulated_in_float64():
    x32 = torch.from_numpy(data(seed=2)).float()
    fit = fit_moments(x32.split(13))
    ref = x32.double().numpy()
    np.testing.assert_allclose(fit.variance("diagonal").numpy(), ref.var(0), rtol=1e-9)


def test_fit_recovers_a_known_gaussian():
    d, n, mu, sigma = 1000, 4000, 0.7, 1.3
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma + mu
    fit = fit_moments(x.split(500))
    assert (fit.mean - mu).abs().max().item() < 5 * sigma / math.sqrt(n)
    assert fit.variance().item() == pytest.approx(sigma**2, rel=5 * math.sqrt(2 / (n * d)))


def test_geometry_matches_high_dimensional_closed_forms():
    d, sigma = 12_288, 0.8  # a 3×64×64 latent
    x = torch.randn(200, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigma
    g = measure_geometry(x)
    assert g["norm_mean"] == pytest.approx(math.sqrt(d) * sigma, rel=0.01)
    assert g["distance_mean"] == pytest.approx(math.sqrt(2 * d) * sigma, rel=0.01)
    assert g["angle_origin_mean"] == pytest.approx(90.0, abs=0.5)
    assert g["angle_point_mean"] == pytest.approx(60.0, abs=0.5)  # three iid points: equilateral
    assert 0 < g["distance_std"] < 0.01 * g["distance_mean"]  # concentration of measure


def test_pairwise_distributions_closed_forms():
    from pipeline.diffusion.ood import pairwise_distributions

    d, sigma = 10_000, 1.0
    x = torch.randn(60, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * sigma
    raw = pairwise_distributions(x)
    assert raw["distance"].numel() == 60 * 59 // 2 and raw["angle_origin"].numel() == 60 * 59 // 2
    assert raw["distance"].mean().item() == pytest.approx(math.sqrt(2 * d) * sigma, rel=0.01)
    assert raw["angle_origin"].mean().item() == pytest.approx(90.0, abs=0.5)
    assert raw["angle_point"].mean().item() == pytest.approx(60.0, abs=0.5)


def test_reservoir_is_bounded_and_independent_of_partition():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(4))
    keys = [f"k{i}" for i in range(100)]
    whole = Reservoir(10).offer(x, keys)
    parts = Reservoir(10)
    for lo, hi in [(0, 33), (33, 34), (34, 100)]:
        parts = parts.merge(Reservoir(10).offer(x[lo:hi], keys[lo:hi]))
    assert whole.latents.shape == (10, 8)
    assert whole.priorities == parts.priorities and torch.equal(whole.latents, parts.latents)


def test_selection_keeps_candidates_within_the_measured_tolerance():
    d = 2000
    g = torch.Generator().manual_seed(5)
    # OOD latents: a Gaussian whose per-dimension scales vary, so an isotropic fit is not exact
    scales = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    ref = torch.randn(128, d, generator=g, dtype=torch.float64) * scales + 0.3
    fit = MomentFit.of(ref)
    geometry = measure_geometry(ref)
    result = sample_latents(fit.mean, fit.variance(), 40, run_seed=1, reference=ref, geometry=geometry, tolerance=2.0)
    assert len(result.indices) == 40 and 0 < result.acceptance_rate <= 1
    kept = draw_candidates(fit.mean, fit.variance(), result.indices, run_seed=1)
    per_point = point_geometry(kept, ref)
    for name in ("distance", "angle_origin", "angle_point"):
        assert ((per_point[name] - geometry[f"{name}_mean"]).abs() <= 2.0 * geometry[f"{name}_std"]).all()
    # rejected candidates really were outside
    rejected = [i for i in range(result.drawn) if i not in set(result.indices)]
    if rejected:
        rej = point_geometry(draw_candidates(fit.mean, fit.variance(), rejected, run_seed=1), ref)
        assert not within_tolerance(rej, geometry, 2.0).any()
    # same seed, same picks, whatever the batch size
    again = sample_latents(fit.mean, fit.variance(), 40, run_seed=1, reference=ref, geometry=geometry, batch=7)
    assert again.indices == result.indices


def test_without_selection_every_candidate_is_kept():
    r = sample_latents(torch.zeros(10), torch.ones(1), 5)
    assert r.indices == [0, 1, 2, 3, 4] and r.acceptance_rate == 1.0


def test_impossible_tolerance_is_a_clear_error():
    ref = torch.randn(32, 100, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with pytest.raises(ValueError, match="raise ood.tolerance"):
        sample_latents(ref.mean(0) + 50, torch.ones(1), 5, reference=ref, geometry=measure_geometry(ref),
                       tolerance=1.0, max_draws=300)


def test_separability_scale():
    s = separability(torch.zeros(10_000), torch.full((10_000,), 0.1))
    assert s["mean_distance"] == pytest.approx(10.0) and s["d_quarter"] == pytest.approx(10.0)
