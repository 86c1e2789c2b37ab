"""Candidate latents for unseen-domain synthesis: Gaussian draws, or the official slerp from a
real OOD latent toward one, optionally moved toward the measured geometry, kept by a geometric
selection. Every candidate is a pure function of (stats, run seed, index, settings), so any
machine regenerates it from its index.

Pure torch on flattened latents (n, d), float64 throughout. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pipeline.diffusion.noise import per_sample_noise, sample_seed
from pipeline.diffusion.ood.geometry import (
    GeometryWindow,
    optimise_latents,
    point_geometry,
    reference_pairs,
    window_statistics,
    within_window,
)

F64 = torch.float64


# ---- sampling ------------------------------------------------------------------------------


@dataclass
class SampleResult:
    indices: list[int]  # candidate indices kept (their seeds reproduce them)
    drawn: int

    @property
    def acceptance_rate(self) -> float:
        return len(self.indices) / self.drawn if self.drawn else 0.0


def candidate_seed(run_seed: int, index: int) -> int:
    return sample_seed(run_seed, f"ood-candidate/{index}")


def draw_candidates(mean: torch.Tensor, variance: torch.Tensor, indices: list[int], run_seed: int) -> torch.Tensor:
    """x_i = μ + σ ⊙ n_i with n_i from candidate i's own seed: (len(indices), d) float64."""
    seeds = [candidate_seed(run_seed, i) for i in indices]
    n = per_sample_noise(seeds, (mean.numel(),)).to(F64)
    return mean.reshape(1, -1).to(F64) + variance.reshape(1, -1).to(F64).sqrt() * n


def within_tolerance(per_point: dict[str, torch.Tensor], geometry: dict[str, float], tolerance: float,
                     keys=("distance", "angle_origin", "angle_point")) -> torch.Tensor:
    """Candidates whose every statistic lies within tolerance × (the data's spread) of the data's mean."""
    ok = torch.ones_like(per_point[keys[0]], dtype=torch.bool)
    for name in keys:
        centre, spread = geometry[f"{name}_mean"], geometry[f"{name}_std"]
        ok &= (per_point[name] - centre).abs() <= tolerance * spread
    return ok


def sample_latents(mean: torch.Tensor, variance: torch.Tensor, count: int, *, run_seed: int = 0,
                   reference: torch.Tensor | None = None, geometry: dict | None = None, tolerance: float = 2.0,
                   batch: int = 256, max_draws: int | None = None) -> SampleResult:
    """Indices of the first ``count`` Gaussian candidates within ``tolerance`` × the data's spread
    of its geometry (or all, without a reference): ``sample_candidates`` with its default settings.
    """
    if reference is not None and geometry is None:
        raise ValueError("geometric selection needs the measured geometry of the reference latents")
    settings = CandidateSettings(selection="tolerance" if reference is not None else "none", tolerance=tolerance)
    result = sample_candidates(OODStats(mean, variance, reference, geometry), count, run_seed=run_seed,
                               settings=settings, batch=batch, max_draws=max_draws)
    return SampleResult(result.indices, result.drawn)


# ---- the official sampler: slerp candidates, tight windows, geometric optimisation ------------
#
# DiscoveryDiff discovery.py:452-604 (`unseen_sample`). That file has CR line endings; its line
# numbers here are those of `git show HEAD:discovery.py | tr '\r' '\n' | cat -n`. There, one
# (real OOD latent, Gaussian draw) pair gives 20 slerp points at weights k/21; each is kept when
# its mean distance and mean angles to 10 random references lie in tight windows. The official
# code takes no gradient step (its "optimizer" prints, discovery.py:548, name the rejection
# tests); `optimise_latents` is this project's reading of the abstract's "geometric optimization".

SLERP_POINTS = 20  # slerp_interpolation(z1, z2, num_points=20), DiscoveryDiff discovery.py:529


def slerp_weights(points: int = SLERP_POINTS) -> torch.Tensor:
    """The official weights k/(points+1), k = 1…points: 1/21 … 20/21 (DiscoveryDiff discovery.py:58)."""
    return torch.arange(1, points + 1, dtype=F64) / (points + 1)


def slerp(a: torch.Tensor, b: torch.Tensor, weight) -> torch.Tensor:
    """The official slerp, row-wise on (n, d) (DiscoveryDiff discovery.py:49-66). The unit
    directions are slerped and the magnitude is interpolated linearly, not carried by the slerp:

      θ = arccos(â·b̂),   x = [sin((1−w)θ)·â + sin(wθ)·b̂] / sin θ · ((1−w)‖a‖ + w‖b‖)

    w = 0 gives a (the real OOD latent, z1 at discovery.py:527), w = 1 gives b (the Gaussian draw,
    z2 at discovery.py:528). ``weight`` is a number or one per row.
    """
    a, b = a.reshape(a.shape[0], -1).to(F64), b.reshape(b.shape[0], -1).to(F64)
    w = torch.as_tensor(weight, dtype=F64).reshape(-1, 1)
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    unit_a, unit_b = a / norm_a, b / norm_b
    theta = torch.arccos((unit_a * unit_b).sum(1, keepdim=True).clamp(-1, 1))  # discovery.py:56-57
    sin = torch.sin(theta)
    direction = (torch.sin((1 - w) * theta) * unit_a + torch.sin(w * theta) * unit_b) / sin  # :59-61
    direction = torch.where(sin > 1e-12, direction, unit_a)  # a ∥ b: nothing to rotate
    return direction * ((1 - w) * norm_a + w * norm_b)  # discovery.py:62-63


@dataclass(frozen=True, eq=False)
class OODStats:
    """What candidates are regenerated from on any machine: the stats file's tensors and header.

    Which latents the Gaussian is fitted on is the caller's choice: the official code fits it on
    the *in-domain* inverted latents (id_x, DiscoveryDiff discovery.py:491, :503-509) and takes
    the slerp sources from the OOD ones (discovery.py:493, :527), so its slerp walks from a real
    OOD latent toward an in-domain draw; this project's stats file fits it on the OOD latents.
    """

    mean: torch.Tensor  # (d,) per-dimension mean: the official mean_vector, discovery.py:507
    variance: torch.Tensor  # (1,) or (d,), a MomentFit.variance kind; "scalar" is the official
    reference: torch.Tensor | None = None  # (m, d) real inverted OOD latents: the stats file's "reference"
    geometry: dict | None = None  # measure_geometry(reference): the stats header's "geometry"


@dataclass(frozen=True)
class CandidateSettings:
    """How candidates are made and kept: with the stats, run seed and index, all a latent needs."""

    mode: str = "gaussian"  # "gaussian": μ + σ·n (sample_latents); "slerp": slerp(real, μ + σ·n, weight)
    weight: float | None = None  # slerp weight w (1: the Gaussian draw); None: choose_slerp_weight
    selection: str = "tolerance"  # "tolerance" (× spread, sample_latents), "window" (official), "none"
    tolerance: float = 2.0
    window: GeometryWindow = field(default_factory=GeometryWindow)
    optimise_steps: int = 0  # gradient steps toward the measured geometry before selection; 0: off
    optimise_lr: float = 0.25
    optimise_references: int = 32  # references per latent for the loss (own stream, not the selection's)

    @classmethod
    def from_dict(cls, values: dict) -> CandidateSettings:
        """Back from ``dataclasses.asdict``, e.g. out of a run's provenance."""
        window = values.get("window") or {}
        return cls(**{**values, "window": window if isinstance(window, GeometryWindow) else GeometryWindow(**window)})


def slerp_source(seed: int, m: int) -> int:
    """The real latent a slerp candidate starts from: uniform over the m references, from the
    candidate's own seed (the official random.randint(0, 999), discovery.py:524)."""
    return sample_seed(seed, "ood-slerp-source") % m


def _sources(stats: OODStats, seeds: list[int], settings: CandidateSettings) -> list[int]:
    if settings.mode != "slerp":
        return [-1] * len(seeds)
    return [slerp_source(s, stats.reference.shape[0]) for s in seeds]


def candidate_latents(stats: OODStats, run_seed: int, indices, settings: CandidateSettings) -> torch.Tensor:
    """Candidates' final latents (n, d) float64, each a pure function of (stats, run_seed, index,
    settings): the Gaussian draw μ + σ·n of ``draw_candidates``; in "slerp" mode, the slerp from
    a real latent toward it; then ``optimise_steps`` gradient steps, one candidate at a time so
    that no batch ever touches a candidate's arithmetic."""
    indices = list(indices)
    x = draw_candidates(stats.mean, stats.variance, indices, run_seed)
    if settings.mode not in ("gaussian", "slerp"):
        raise ValueError(f"ood.candidates must be 'gaussian' or 'slerp', got {settings.mode!r}")
    if settings.mode == "gaussian" and not settings.optimise_steps:
        return x
    if stats.reference is None or (settings.optimise_steps and stats.geometry is None):
        raise ValueError("slerp and optimisation need the reference latents (and their measured geometry)")
    seeds = [candidate_seed(run_seed, i) for i in indices]
    sources = _sources(stats, seeds, settings)
    if settings.mode == "slerp":
        if settings.weight is None:
            raise ValueError("slerp candidates need a weight: pass one, or let choose_slerp_weight pick it")
        x = slerp(stats.reference[sources], x, settings.weight)
    if settings.optimise_steps:
        m = stats.reference.shape[0]
        rows = []
        for j, (seed, source) in enumerate(zip(seeds, sources, strict=True)):
            idx, partner = reference_pairs(seed, m, settings.optimise_references, source, stream="optimise")
            rows.append(optimise_latents(x[j : j + 1], stats.reference, idx[None], partner[None], stats.geometry,
                                         settings.optimise_steps, settings.optimise_lr))
        x = torch.cat(rows) if rows else x
    return x


def candidate_latent(stats: OODStats, run_seed: int, index: int, settings: CandidateSettings) -> torch.Tensor:
    """One candidate's final latent (d,): what a decoding stage regenerates from its index."""
    return candidate_latents(stats, run_seed, [index], settings)[0]


def selection_mask(x: torch.Tensor, stats: OODStats, settings: CandidateSettings, seeds: list[int],
                   exclude: list[int] | None = None) -> torch.Tensor:
    """Which rows of x the selection keeps. "window": row j against references drawn from
    seeds[j], never exclude[j]; "tolerance": ``within_tolerance`` over all references (the
    existing path, which does not set a slerp candidate's own source aside)."""
    if settings.selection == "none":
        return torch.ones(x.shape[0], dtype=torch.bool)
    if stats.reference is None or stats.geometry is None:
        raise ValueError("geometric selection needs the reference latents and their measured geometry")
    if settings.selection == "tolerance":
        return within_tolerance(point_geometry(x, stats.reference), stats.geometry, settings.tolerance)
    if settings.selection != "window":
        raise ValueError(f"selection must be 'tolerance', 'window' or 'none', got {settings.selection!r}")
    if x.shape[0] == 0:
        return torch.ones(0, dtype=torch.bool)
    m, count = stats.reference.shape[0], settings.window.references
    pairs = [reference_pairs(s, m, count, e) for s, e in zip(seeds, exclude or [-1] * len(seeds), strict=True)]
    idx, partner = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return within_window(window_statistics(x, stats.reference, idx, partner), stats.geometry, settings.window)


def acceptance_rate(latents: torch.Tensor, stats: OODStats, settings: CandidateSettings, seed: int = 0,
                    exclude: list[int] | None = None) -> float:
    """The share of ``latents`` (n, d) the selection keeps: report it on candidates, on held-out
    real OOD latents and on in-domain latents. Row j draws its references from (seed, j); pass
    ``exclude`` (each row's index among the references) for latents that are references themselves."""
    n = latents.shape[0]
    seeds = [sample_seed(seed, f"ood-acceptance/{j}") for j in range(n)]
    return float(selection_mask(latents, stats, settings, seeds, exclude).double().mean()) if n else 0.0


def _kept(stats: OODStats, run_seed: int, indices: list[int], settings: CandidateSettings) -> torch.Tensor:
    x = candidate_latents(stats, run_seed, indices, settings)
    seeds = [candidate_seed(run_seed, i) for i in indices]
    return selection_mask(x, stats, settings, seeds, _sources(stats, seeds, settings))


def slerp_acceptance(stats: OODStats, run_seed: int, settings: CandidateSettings, probe: int = 64) -> torch.Tensor:
    """Acceptance at each official weight k/21 (k = 1…20) of ``probe`` slerp candidates: indices
    0…probe−1 under their own run seed, so they share no draws with the candidates proper."""
    probe_seed = sample_seed(run_seed, "ood-slerp-probe")
    return torch.tensor([float(_kept(stats, probe_seed, list(range(probe)),
                                     replace(settings, mode="slerp", weight=w)).double().mean())
                         for w in slerp_weights().tolist()], dtype=F64)


def choose_slerp_weight(stats: OODStats, run_seed: int, settings: CandidateSettings, probe: int = 64,
                        target_rate: float = 0.5) -> float:
    """The weight "chosen by the geometry": the largest official k/21 whose probe candidates still
    pass the selection at ``target_rate`` or more. The largest, because w is the Gaussian draw's
    share: the further a candidate moves from the real latent it starts from, the newer it is,
    and acceptance falls with k (the review measured 100 % at k = 1, 0 % at k = 20 on the demo)."""
    rates = slerp_acceptance(stats, run_seed, settings, probe)
    passing = (rates >= target_rate).nonzero().flatten()
    if passing.numel() == 0:
        raise ValueError(f"no slerp weight k/21 keeps {target_rate:.0%} of {probe} probe candidates "
                         f"(best {float(rates.max()):.0%}); widen the selection window or lower the target rate")
    return float(slerp_weights()[passing[-1]])


@dataclass
class CandidateResult(SampleResult):
    # settings with the weight resolved: candidate_latents(stats, run_seed, indices, settings)
    # regenerates every kept latent anywhere
    settings: CandidateSettings = field(default_factory=CandidateSettings)


def sample_candidates(stats: OODStats, count: int, *, run_seed: int = 0,
                      settings: CandidateSettings | None = None, batch: int = 256, max_draws: int | None = None,
                      probe: int = 64, target_rate: float = 0.5) -> CandidateResult:
    """Indices of the first ``count`` candidates the selection keeps, in index order (so the
    kept set is the same however it is batched), with the settings that regenerate them.
    The default settings reproduce ``sample_latents``; slerp without a weight chooses one first."""
    settings = settings or CandidateSettings()
    if settings.mode == "slerp" and settings.weight is None:
        settings = replace(settings, weight=choose_slerp_weight(stats, run_seed, settings, probe, target_rate))
    if settings.selection == "none":
        return CandidateResult(list(range(count)), count, settings)
    max_draws = max_draws or max(100 * count, 10_000)
    kept: list[int] = []
    drawn = 0
    while len(kept) < count and drawn < max_draws:
        idx = list(range(drawn, min(drawn + batch, max_draws)))
        for i, good in zip(idx, _kept(stats, run_seed, idx, settings).tolist(), strict=True):
            if good and len(kept) < count:
                kept.append(i)
            drawn = i + 1
            if len(kept) == count:
                break
    if len(kept) < count:
        widen = (f"raise ood.tolerance (now {settings.tolerance})" if settings.selection == "tolerance"
                 else "widen the window (ood.window: calibrated, a larger ood.window_coverage)")
        raise ValueError(f"geometric selection ({settings.selection}) kept {len(kept)} of {drawn} candidates, "
                         f"short of {count}; {widen} or lower ood.count")
    return CandidateResult(kept, drawn, settings)
