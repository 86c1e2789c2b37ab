"""The official DiscoveryDiff sampler in diffusion/ood/candidates.py: scalar variance, slerp candidates, window
selection, geometric optimisation. Expected values come from numpy, from the official formulas
re-derived here, or from closed forms of constructed data; never from the code under test."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from pipeline.diffusion.noise import per_sample_noise, sample_seed
from pipeline.diffusion.ood import (
    CandidateSettings,
    GeometryWindow,
    MomentFit,
    OODStats,
    acceptance_rate,
    calibrate_window,
    candidate_latent,
    candidate_latents,
    choose_slerp_weight,
    draw_candidates,
    fit_moments,
    geometric_loss,
    measure_geometry,
    optimise_latents,
    point_geometry,
    reference_pairs,
    sample_candidates,
    sample_latents,
    slerp,
    slerp_weights,
    window_statistics,
)

F64 = torch.float64
WINDOW = CandidateSettings(selection="window")  # the official windows: 10 references, 0.05 %, ±0.1°


def np_slerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """DiscoveryDiff discovery.py:49-66, re-derived: slerp the unit directions, interpolate the
    magnitude linearly."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / na, b / nb
    theta = np.arccos(np.clip(ua @ ub, -1, 1))
    direction = (np.sin((1 - w) * theta) * ua + np.sin(w * theta) * ub) / np.sin(theta)
    return direction * ((1 - w) * na + w * nb)


def np_angle(u: np.ndarray, v: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1)))


def simplex(d: int, n: int, scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n latents μ + ρ·q_i with q_i orthonormal and orthogonal to μ, ρ = √d, and a structured
    mean μ (non-constant entries). Returns (latents, μ)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n + 1, generator=g, dtype=F64))
    q = q.T  # rows orthonormal
    mu = q[-1] * math.sqrt(d) * 0.5 * scale
    return mu + math.sqrt(d) * q[:-1], mu


# ---- 1. the official variance --------------------------------------------------------------


def data(n=240, d=40, seed=0):
    rng = np.random.default_rng(seed)
    # per-dimension means that differ (so the scalar and isotropic kinds differ), a large offset
    return rng.normal(0.0, 1.0, (n, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(0, 3, d) + 1e4


@pytest.mark.parametrize("splits", [[240], [1] * 240, [7, 100, 1, 132], [120, 120]])
def test_scalar_variance_is_numpy_var_over_every_entry_whatever_the_batching(splits):
    x = data()
    fit = fit_moments(torch.from_numpy(b) for b in np.split(x, np.cumsum(splits)[:-1]))
    # discovery.py:509: variance_scalar = np.var(flattened_data), one number over all n·d entries
    assert fit.variance("scalar").item() == pytest.approx(np.var(x), rel=1e-9)
    # and it is not the mean of per-dimension variances (the project's "isotropic" kind)
    assert fit.variance("isotropic").item() == pytest.approx(x.var(0).mean(), rel=1e-9)
    assert np.var(x) > 1.5 * x.var(0).mean()


def test_scalar_variance_merges_across_actors_in_any_order():
    x = torch.from_numpy(data(seed=1))
    a, b, c = MomentFit.of(x[:30]), MomentFit.of(x[30:200]), MomentFit.of(x[200:])
    left, right, other = a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(a).merge(b)
    want = np.var(x.numpy())
    for fit in (left, right, other):
        assert fit.variance("scalar").item() == pytest.approx(want, rel=1e-9)


def test_official_draws_use_the_per_dimension_mean_and_the_scalar_variance():
    # discovery.py:512: np.random.normal(mean_vector, sqrt(variance_scalar)): per-dimension
    # centre, one spread
    x = torch.from_numpy(data(n=200, d=30, seed=2))
    fit = MomentFit.of(x)
    draws = draw_candidates(fit.mean, fit.variance("scalar"), list(range(4000)), run_seed=0).numpy()
    want_mean, want_var = x.numpy().mean(0), np.var(x.numpy())
    assert np.abs(draws.mean(0) - want_mean).max() < 5 * math.sqrt(want_var / 4000)
    assert (draws - want_mean).var() == pytest.approx(want_var, rel=0.02)


def test_unknown_variance_kind_is_an_error():
    with pytest.raises(ValueError, match="scalar"):
        MomentFit.of(torch.ones(3, 2)).variance("grand")


# ---- 2. slerp -------------------------------------------------------------------------------


def test_weights_are_the_official_k_over_21():
    assert slerp_weights().tolist() == pytest.approx([k / 21 for k in range(1, 21)], abs=1e-15)


def test_slerp_endpoints_norms_angles_and_the_official_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 300, generator=g, dtype=F64) * 2 + 0.3
    b = torch.randn(5, 300, generator=g, dtype=F64)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-12)  # w = 0: the real latent (z1)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-12)  # w = 1: the Gaussian draw (z2)
    for w in (1 / 21, 5 / 21, 0.5, 20 / 21):
        x = slerp(a, b, w).numpy()
        for j in range(5):
            aj, bj = a[j].numpy(), b[j].numpy()
            np.testing.assert_allclose(x[j], np_slerp(aj, bj, w), rtol=1e-10, atol=1e-12)
            theta = np_angle(aj, bj)
            # on the great circle from a to b, w of the way along, with a linear magnitude
            assert np_angle(x[j], aj) == pytest.approx(w * theta, abs=1e-6)
            assert np_angle(x[j], bj) == pytest.approx((1 - w) * theta, abs=1e-6)
            assert np.linalg.norm(x[j]) == pytest.approx((1 - w) * np.linalg.norm(aj) + w * np.linalg.norm(bj))
    # one weight per row
    w = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.75], dtype=F64)
    rows = slerp(a, b, w).numpy()
    for j in range(5):
        np.testing.assert_allclose(rows[j], np_slerp(a[j].numpy(), b[j].numpy(), float(w[j])), atol=1e-10)


def test_slerp_of_parallel_vectors_stays_finite():
    a = torch.ones(1, 10, dtype=F64)
    x = slerp(a, 3 * a, 0.5)
    assert torch.allclose(x, 2 * a)


def gaussian_stats(d=256, m=12, seed=0) -> OODStats:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(m, d, generator=g, dtype=F64) + 0.5
    fit = MomentFit.of(ref)
    return OODStats(fit.mean, fit.variance("scalar"), ref.float(), measure_geometry(ref))


def test_a_slerp_candidate_is_the_official_slerp_of_one_reservoir_latent_and_its_gaussian_draw():
    stats = gaussian_stats()
    w = 5 / 21
    settings = CandidateSettings(mode="slerp", weight=w)
    x = candidate_latents(stats, 7, range(10), settings).numpy()
    draws = draw_candidates(stats.mean, stats.variance, list(range(10)), 7).numpy()
    ref = stats.reference.double().numpy()
    for j in range(10):
        matches = [s for s in range(len(ref)) if np.allclose(x[j], np_slerp(ref[s], draws[j], w), atol=1e-9)]
        assert len(matches) == 1
    # at w = 1 a slerp candidate is exactly the Gaussian candidate of the same index
    at_one = candidate_latents(stats, 7, range(10), replace(settings, weight=1.0)).numpy()
    np.testing.assert_allclose(at_one, draws, atol=1e-9)
    # the sources spread over the reservoir (a seed-derived choice, not always the same latent)
    sources = {next(s for s in range(len(ref)) if np.allclose(x[j], np_slerp(ref[s], draws[j], w), atol=1e-9))
               for j in range(10)}
    assert len(sources) > 3


def test_candidates_do_not_depend_on_batch_composition():
    stats = gaussian_stats()
    for settings in (CandidateSettings(mode="slerp", weight=3 / 21),
                     CandidateSettings(mode="slerp", weight=3 / 21, optimise_steps=3),
                     CandidateSettings(optimise_steps=2)):
        whole = candidate_latents(stats, 3, range(12), settings)
        backwards = candidate_latents(stats, 3, range(11, -1, -1), settings).flip(0)
        mixed = torch.cat([candidate_latents(stats, 3, [0, 1, 2, 3, 4], settings),
                           candidate_latents(stats, 3, [5], settings),
                           candidate_latents(stats, 3, range(6, 12), settings)])
        assert torch.equal(whole, backwards) and torch.equal(whole, mixed)
        assert torch.equal(candidate_latent(stats, 3, 9, settings), whole[9])


def test_settings_round_trip_regenerates_the_same_latents():
    stats = gaussian_stats()
    settings = CandidateSettings(mode="slerp", weight=2 / 21, selection="window",
                                 window=GeometryWindow(10, 0.01, 0.5, 0.5), optimise_steps=2)
    again = CandidateSettings.from_dict(asdict(settings))
    assert again == settings
    assert torch.equal(candidate_latents(stats, 1, [4, 8], settings), candidate_latents(stats, 1, [4, 8], again))


# ---- 3. window selection ------------------------------------------------------------------


def test_reference_pairs_are_seeded_never_the_excluded_latent_and_partner_the_next_index():
    m = 7
    for seed in range(50):
        idx, partner = reference_pairs(seed, m, 10, exclude=3)
        assert idx.shape == (10,) and not (idx == 3).any() and not (partner == 3).any()
        want = [(i + 1) % m if (i + 1) % m != 3 else (i + 2) % m for i in idx.tolist()]
        assert partner.tolist() == want
        again = reference_pairs(seed, m, 10, exclude=3)
        assert torch.equal(again[0], idx)
    free = torch.cat([reference_pairs(s, m, 10)[0] for s in range(200)])
    assert set(free.tolist()) == set(range(m))  # without an exclusion every latent is drawn
    assert not torch.equal(reference_pairs(0, m, 10)[0], reference_pairs(0, m, 10, stream="optimise")[0])


def test_window_statistics_match_the_official_loops():
    # discovery.py:541-569 with its loops written out here in numpy
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(9, 50, generator=g, dtype=F64) + 0.2
    x = torch.randn(4, 50, generator=g, dtype=F64)
    pairs = [reference_pairs(s, 9, 10) for s in range(4)]
    idx, partner = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    got = window_statistics(x, ref, idx, partner)
    r = ref.numpy()
    for j in range(4):
        xj, ii, pp = x[j].numpy(), idx[j].tolist(), partner[j].tolist()
        dist = sum(np.sqrt(np.sum((xj - r[i]) ** 2)) for i in ii) / 10
        origin = sum(np_angle(xj, r[i]) for i in ii) / 10
        point = sum(np_angle(r[i] - xj, r[p] - xj) for i, p in zip(ii, pp, strict=True)) / 10
        assert got["distance"][j].item() == pytest.approx(dist, rel=1e-12)
        assert got["angle_origin"][j].item() == pytest.approx(origin, rel=1e-10)
        assert got["angle_point"][j].item() == pytest.approx(point, rel=1e-10)


def test_official_windows_reject_gaussian_draws_and_keep_held_out_real_latents():
    """Real OOD latents here are vertices of a regular simplex, μ + ρ·q_i (q_i orthonormal, ⟂ μ):
    every pair is exactly ρ√2 apart, every angle at the origin is arccos(|μ|²/(|μ|² + ρ²)) and
    every angle at a vertex between two others is 60°. A held-out vertex (a new orthonormal
    direction) therefore has exactly the measured geometry and passes even 0.05 % / 0.1° windows.
    A Gaussian draw from the fit N(μ̂, σ²I) cannot: its squared distance to a vertex is about
    ρ²(1 − 1/n) + dσ². With the isotropic σ² = ρ²(1 − 1/n)/d that is 2ρ²(1 − 1/n), 1/(2n) = 0.8 %
    short in distance at n = 64, sixteen windows away, and the draw's own radius fluctuates by
    only √(2/d); with the official scalar σ², which adds the spread of μ's entries, it is farther
    still. In-domain latents (another simplex around −μ) are far off in every statistic."""
    d, n = 4096, 64
    latents, _ = simplex(d, n + 16)
    ref, held = latents[:n], latents[n:]
    in_domain = simplex(d, 16, scale=-1.0, seed=1)[0]
    fit, geometry = MomentFit.of(ref), measure_geometry(ref)
    for kind in ("isotropic", "scalar"):
        stats = OODStats(fit.mean, fit.variance(kind), ref, geometry)
        draws = candidate_latents(stats, 0, range(200), CandidateSettings())
        assert acceptance_rate(draws, stats, WINDOW) <= 0.05
        assert acceptance_rate(held, stats, WINDOW) == 1.0
        assert acceptance_rate(in_domain, stats, WINDOW) == 0.0
    # the reference latents themselves, each against the others, pass too
    assert acceptance_rate(ref, stats, WINDOW, exclude=list(range(n))) == 1.0


def test_calibrated_windows_keep_held_out_ood_and_reject_in_domain_latents():
    # the official setting: Gaussian fitted on in-domain latents (discovery.py:491, :503-509),
    # references are inverted OOD latents. At d = 4096 a 10-reference mean fluctuates by ~1 %,
    # so the official 0.05 % window rejects real OOD latents too; windows calibrated on the
    # reference latents (90 % per statistic) keep most held-out OOD latents and no ID latent.
    d = 4096
    g = torch.Generator().manual_seed(1)
    ood = torch.randn(96, d, generator=g, dtype=F64)
    in_domain = torch.randn(32, d, generator=g, dtype=F64) + 0.6
    ref, held = ood[:64], ood[64:]
    geometry = measure_geometry(ref)
    fit = MomentFit.of(in_domain)
    stats = OODStats(fit.mean, fit.variance("scalar"), ref, geometry)
    assert acceptance_rate(held, stats, WINDOW) == 0.0  # official windows: too tight at this d
    window = calibrate_window(ref, geometry, coverage=0.9)
    assert window.distance > GeometryWindow().distance
    calibrated = replace(WINDOW, window=window)
    assert acceptance_rate(held, stats, calibrated) >= 0.5
    assert acceptance_rate(in_domain, stats, calibrated) == 0.0
    assert acceptance_rate(ref, stats, calibrated, exclude=list(range(64))) >= 0.7  # jointly ≥ 1 − 3·0.1


def test_slerp_weight_is_the_largest_k_over_21_that_still_passes():
    """References: OOD latents r ~ N(0, I_d), so ‖r‖ ≈ A = √d and the measured distance is ≈ A√2.
    Gaussian: in-domain N(1.5, 1.75), so ‖b‖ ≈ B = 2A. A slerp candidate x has norm
    (1 − w)A + wB and is nearly orthogonal to every reference, so its mean distance is
    √(((1 − w)A + wB)² + A²): relative excess f(w) = √(((1 + w)² + 1)/2) − 1. With a distance
    window δ (angles left free) the chosen weight must be the largest k/21 with f(k/21) ≤ δ."""
    d = 8192
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(64, d, generator=g, dtype=F64)
    stats = OODStats(torch.full((d,), 1.5, dtype=F64), torch.tensor([1.75], dtype=F64), ref, measure_geometry(ref))
    delta = 0.06
    excess = [math.sqrt(((1 + k / 21) ** 2 + 1) / 2) - 1 for k in range(1, 21)]
    k_star = max(k for k in range(1, 21) if excess[k - 1] <= delta)
    assert k_star == 2 and excess[1] < delta - 0.01 and excess[2] > delta + 0.01  # margins ≫ noise
    settings = CandidateSettings(mode="slerp", selection="window", window=GeometryWindow(10, delta, 180.0, 180.0))
    assert choose_slerp_weight(stats, 0, settings, probe=32) == pytest.approx(k_star / 21)
    result = sample_candidates(stats, 8, run_seed=0, settings=settings, probe=32)
    assert result.settings.weight == pytest.approx(k_star / 21) and len(result.indices) == 8
    kept = candidate_latents(stats, 0, result.indices, result.settings)
    distance = point_geometry(kept, ref)["distance"] / stats.geometry["distance_mean"] - 1
    assert (distance.abs() < delta + 0.01).all()
    with pytest.raises(ValueError, match="no slerp weight"):
        choose_slerp_weight(stats, 0, replace(settings, window=GeometryWindow(10, 0.001, 180.0, 180.0)), probe=8)


def test_kept_set_does_not_depend_on_batching():
    stats = gaussian_stats(d=512, m=32)
    settings = CandidateSettings(mode="slerp", weight=1 / 21, selection="window",
                                 window=calibrate_window(stats.reference, stats.geometry, coverage=0.7))
    a = sample_candidates(stats, 6, run_seed=4, settings=settings, batch=256)
    b = sample_candidates(stats, 6, run_seed=4, settings=settings, batch=5)
    assert a.indices == b.indices and a.drawn == b.drawn and 0 < a.acceptance_rate < 1


# ---- 4. geometric optimisation ------------------------------------------------------------


def test_optimisation_lowers_the_loss_and_moves_the_distance_toward_the_target():
    d, n = 4096, 64
    ref, _ = simplex(d, n)
    fit, geometry = MomentFit.of(ref), measure_geometry(ref)
    x = draw_candidates(fit.mean, fit.variance("scalar"), list(range(6)), run_seed=0)
    pairs = [reference_pairs(s, n, 32, stream="optimise") for s in range(6)]
    idx, partner = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    y = optimise_latents(x, ref, idx, partner, geometry, steps=10)
    before, after = geometric_loss(x, ref, idx, partner, geometry), geometric_loss(y, ref, idx, partner, geometry)
    assert (after < before / 10).all()
    # measured independently, against every reference: the distance and angles moved toward the targets
    target = geometry["distance_mean"]
    dist_before, dist_after = point_geometry(x, ref)["distance"], point_geometry(y, ref)["distance"]
    assert ((dist_after - target).abs() < (dist_before - target).abs() / 4).all()
    ang_before, ang_after = point_geometry(x, ref)["angle_point"], point_geometry(y, ref)["angle_point"]
    assert ((ang_after - 60.0).abs() < (ang_before - 60.0).abs() / 4).all()
    # deterministic, and a few steps stay a small move
    assert torch.equal(y, optimise_latents(x, ref, idx, partner, geometry, steps=10))
    assert ((y - x).norm(dim=1) < 0.2 * x.norm(dim=1)).all()


def test_optimisation_leaves_a_latent_already_at_the_target_where_it_is():
    d, n = 2048, 40
    latents, _ = simplex(d, n + 1)
    ref, vertex = latents[:n], latents[n:]  # a held-out vertex: its geometry is the target exactly
    geometry = measure_geometry(ref)
    idx, partner = reference_pairs(0, n, 16, stream="optimise")
    y = optimise_latents(vertex, ref, idx[None], partner[None], geometry, steps=5)
    assert torch.allclose(y, vertex, atol=1e-6 * vertex.norm().item())


def test_optimised_candidates_pass_selection_more_often():
    d, n = 4096, 64
    ref, _ = simplex(d, n)
    fit, geometry = MomentFit.of(ref), measure_geometry(ref)
    stats = OODStats(fit.mean, fit.variance("scalar"), ref, geometry)
    loose = replace(WINDOW, window=GeometryWindow(10, 0.005, 1.0, 1.0))
    plain = candidate_latents(stats, 0, range(40), CandidateSettings())
    optimised = candidate_latents(stats, 0, range(40), CandidateSettings(optimise_steps=10))
    assert acceptance_rate(plain, stats, loose) == 0.0
    assert acceptance_rate(optimised, stats, loose) >= 0.5


# ---- 5. the default path is unchanged -------------------------------------------------------


def test_default_gaussian_path_is_unchanged():
    g = torch.Generator().manual_seed(11)
    d = 600
    scales = torch.rand(d, generator=g, dtype=F64) + 0.5
    ref = torch.randn(48, d, generator=g, dtype=F64) * scales + 0.3
    fit, geometry = MomentFit.of(ref), measure_geometry(ref)
    # recorded from ood.py (git HEAD e8330f1, when noise moved to the counter-based generator; the
    # selection logic is the one of 8769ad8, before the official sampler was added)
    old = sample_latents(fit.mean, fit.variance(), 12, run_seed=3, reference=ref, geometry=geometry, tolerance=1.0)
    assert old.indices == [0, 3, 4, 8, 10, 11, 22, 31, 34, 35, 40, 42] and old.drawn == 43
    x = draw_candidates(fit.mean, fit.variance(), [0, 5], run_seed=3)
    np.testing.assert_allclose(x[:, :3].numpy(), [[-0.28119094681620105, 1.7183647274591223, -1.0520901193437728],
                                                  [0.8464212714583383, 0.34117701192798255, 1.6927132171613928]],
                               rtol=1e-12)
    # and it is μ + σ ⊙ n with n candidate i's own noise map
    n = per_sample_noise([sample_seed(3, f"ood-candidate/{i}") for i in (0, 5)], (d,)).to(F64)
    assert torch.allclose(x, fit.mean.to(F64) + fit.variance().to(F64).sqrt() * n, rtol=1e-12, atol=0)
    # the new entry with default settings is the old one
    stats = OODStats(fit.mean, fit.variance(), ref, geometry)
    new = sample_candidates(stats, 12, run_seed=3, settings=CandidateSettings(tolerance=1.0))
    assert new.indices == old.indices and new.drawn == old.drawn
    assert torch.equal(candidate_latents(stats, 3, [0, 5], CandidateSettings()), x)
    unselected = sample_candidates(stats, 4, settings=CandidateSettings(selection="none"))
    assert unselected.indices == [0, 1, 2, 3] and unselected.acceptance_rate == 1.0


def test_bad_settings_are_clear_errors():
    stats = gaussian_stats()
    with pytest.raises(ValueError, match="'gaussian' or 'slerp'"):
        candidate_latents(stats, 0, [0], CandidateSettings(mode="lerp"))
    with pytest.raises(ValueError, match="need a weight"):
        candidate_latents(stats, 0, [0], CandidateSettings(mode="slerp"))
    with pytest.raises(ValueError, match="selection must be"):
        acceptance_rate(stats.reference, stats, CandidateSettings(selection="strict"))
    with pytest.raises(ValueError, match="short of"):
        sample_candidates(stats, 3, settings=replace(WINDOW, window=GeometryWindow(10, 1e-9, 1e-9, 1e-9)),
                          max_draws=50)
