"""Gaussian statistics of out-of-domain latents, their geometry, and geometric sampling
("Unseen Image Synthesis with Diffusion Models", seed 003).

OOD images DDIM-inverted to an intermediate t0 through a frozen single-domain model form a
Gaussian N(μ, σ²I) there, distinguishable from the in-domain one. We fit μ and σ² in one
streaming pass that merges across batches and actors, keep a bounded uniform reservoir of
latents, measure the geometry of that reservoir, and sample new latents from the Gaussian,
keeping those whose geometry against the reservoir matches what the data shows.

Pure torch on flattened latents (n, d), float64 throughout. No Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.diffusion.noise import per_sample_noise, sample_seed

F64 = torch.float64


# ---- where the latents live ---------------------------------------------------------------


def ood_grid(schedule, t0: int, steps: int) -> list[int]:
    """A descending DDIM grid from (about) t0 down to the end, about ``steps`` long.

    The scheduler's own grid of round(steps · T / t0) steps over the whole range, from t0
    snapped to it (``Schedule.grid_from``: callers log when it moved).
    """
    total = schedule.num_train_timesteps
    if not 0 < t0 < total:
        raise ValueError(f"t0 = {t0} must lie in 1..{total - 1} (the model's training timesteps)")
    return schedule.grid_from(t0, max(steps, round(steps * total / t0)))


# ---- moments: Chan et al. (1979) parallel variance -----------------------------------


@dataclass
class MomentFit:
    """Count, per-dimension mean and sum of squared deviations (M2), in float64.

    Two fits merge exactly (Chan, Golub & LeVeque 1979):
      δ = μ_b − μ_a,  n = n_a + n_b,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
    which avoids the cancellation of E[x²] − E[x]² in low precision.
    """

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor) -> MomentFit:
        """The fit of one batch (n, …): flattened to (n, d) and promoted to float64 first."""
        x = x.reshape(x.shape[0], -1).to(F64)
        if x.shape[0] == 0:
            return cls()
        mean = x.mean(0)
        return cls(int(x.shape[0]), mean, ((x - mean) ** 2).sum(0))

    def merge(self, other: MomentFit) -> MomentFit:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge fits of {self.mean.numel()} and {other.mean.numel()} dimensions")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return MomentFit(n, mean, m2)

    def update(self, x: torch.Tensor) -> MomentFit:
        return self.merge(MomentFit.of(x))

    def variance(self, kind: str = "isotropic") -> torch.Tensor:
        """Population variance (ddof = 0): per dimension ("diagonal"), or one scalar ("isotropic")."""
        if self.count == 0:
            raise ValueError("no latents were fitted (empty input?)")
        var = self.m2 / self.count
        if kind == "diagonal":
            return var
        if kind == "isotropic":
            return var.mean().reshape(1)  # σ² = tr(Σ)/d, the paper code's single scalar
        raise ValueError(f"variance must be 'isotropic' or 'diagonal', got {kind!r}")


def fit_moments(batches) -> MomentFit:
    """Fit from an iterator of latent batches."""
    fit = MomentFit()
    for x in batches:
        fit = fit.update(x)
    return fit


# ---- bounded, mergeable reservoir --------------------------------------------------------


def priority(key: str) -> float:
    """A sample's reservoir priority in [0, 1): a hash of its key, the same on every actor."""
    return sample_seed(0, "reservoir/" + key) / 2**63


@dataclass
class Reservoir:
    """The k samples with the smallest priorities: a uniform sample of everything offered,
    independent of batching and of how actors split the data (a bottom-k sketch)."""

    capacity: int
    priorities: list[float] = field(default_factory=list)
    latents: torch.Tensor | None = None  # (m, d) float32

    def offer(self, x: torch.Tensor, keys: list[str]) -> Reservoir:
        x = x.reshape(x.shape[0], -1).float().cpu()
        return self.merge(Reservoir(self.capacity, [priority(k) for k in keys], x))

    def merge(self, other: Reservoir) -> Reservoir:
        if other.latents is None or len(other.priorities) == 0:
            return self
        if self.latents is None:
            pri, lat = list(other.priorities), other.latents
        else:
            pri, lat = self.priorities + list(other.priorities), torch.cat([self.latents, other.latents])
        order = sorted(range(len(pri)), key=pri.__getitem__)[: self.capacity]
        return Reservoir(self.capacity, [pri[i] for i in order], lat[order])


# ---- geometry ------------------------------------------------------------------------------


def _angles(cos: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def point_geometry(x: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False,
                   max_pairs: int = 2048, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per point of x (n, d), its geometry against the reference set (m, d):

      distance      mean ‖x − r_j‖ over references
      angle_origin  mean angle at the origin between x and r_j (degrees)
      angle_point   mean angle at x between r_j − x and r_k − x over reference pairs (degrees)

    ``exclude_self`` when x is the reference set itself (drop j = i and pairs holding i).
    """
    x, ref = x.reshape(x.shape[0], -1).to(F64), ref.reshape(ref.shape[0], -1).to(F64)
    dist = torch.cdist(x, ref)  # (n, m)
    cos0 = (x @ ref.T) / (x.norm(dim=1, keepdim=True) * ref.norm(dim=1)[None])
    ang0 = _angles(cos0)
    m = ref.shape[0]
    mask = torch.ones_like(dist, dtype=torch.bool)
    if exclude_self:
        mask.fill_diagonal_(False)
    counts = mask.sum(1).clamp(min=1)
    out = {"distance": (dist * mask).sum(1) / counts, "angle_origin": (ang0 * mask).sum(1) / counts}

    # angle at x between r_j − x and r_k − x: cos = ((r_j−x)·(r_k−x)) / (|r_j−x||r_k−x|),
    # over a fixed random subset of pairs (j < k) so the cost stays bounded for large m
    g = torch.Generator().manual_seed(seed)
    j = torch.randint(0, m, (max_pairs,), generator=g)
    k = torch.randint(0, m, (max_pairs,), generator=g)
    keep = j != k
    j, k = j[keep], k[keep]
    gram_rr = ref @ ref.T
    xr = x @ ref.T  # (n, m)
    xx = (x * x).sum(1, keepdim=True)  # (n, 1)
    dot = gram_rr[j, k][None] - xr[:, j] - xr[:, k] + xx  # (r_j−x)·(r_k−x)
    cos = dot / (dist[:, j] * dist[:, k]).clamp(min=1e-300)
    ang = _angles(cos)
    pair_mask = torch.ones_like(ang, dtype=torch.bool)
    if exclude_self:
        idx = torch.arange(x.shape[0])[:, None]
        pair_mask = (j[None] != idx) & (k[None] != idx)
    out["angle_point"] = (ang * pair_mask).sum(1) / pair_mask.sum(1).clamp(min=1)
    out["norm"] = x.norm(dim=1)
    return out


GEOMETRY_KEYS = ("norm", "distance", "angle_origin", "angle_point")


def pairwise_distributions(x: torch.Tensor, max_triplets: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw values for histograms: norms, every pairwise distance and angle at the origin (i < j),
    and the angle at a point between two others over random triplets (degrees)."""
    x = x.reshape(x.shape[0], -1).to(F64)
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    norms = x.norm(dim=1)
    dist = torch.cdist(x, x)
    cos0 = (x @ x.T) / (norms[:, None] * norms[None])
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(0, n, (max_triplets,), generator=g) for _ in range(3))
    keep = (a != b) & (a != c) & (b != c)
    a, b, c = a[keep], b[keep], c[keep]
    u, v = x[b] - x[a], x[c] - x[a]
    cos_p = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    return {"norm": norms, "distance": dist[i, j], "angle_origin": _angles(cos0[i, j]), "angle_point": _angles(cos_p)}


def measure_geometry(ref: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The reservoir's geometry: mean and spread (std over points) of each per-point statistic."""
    per_point = point_geometry(ref, ref, exclude_self=True, seed=seed)
    out = {}
    for name in GEOMETRY_KEYS:
        v = per_point[name]
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return out


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
    """Indices of the first ``count`` candidates that pass geometric selection (or all, without).

    Candidates are drawn in index order, so the kept set is the same however it is batched.
    """
    if reference is None:
        return SampleResult(list(range(count)), count)
    if geometry is None:
        raise ValueError("geometric selection needs the measured geometry of the reference latents")
    max_draws = max_draws or max(100 * count, 10_000)
    kept: list[int] = []
    drawn = 0
    while len(kept) < count and drawn < max_draws:
        idx = list(range(drawn, min(drawn + batch, max_draws)))
        x = draw_candidates(mean, variance, idx, run_seed)
        ok = within_tolerance(point_geometry(x, reference), geometry, tolerance)
        for i, good in zip(idx, ok.tolist(), strict=True):
            if good and len(kept) < count:
                kept.append(i)
            drawn = i + 1
            if len(kept) == count:
                break
    if len(kept) < count:
        raise ValueError(
            f"geometric selection kept {len(kept)} of {drawn} candidates, short of {count}; "
            f"raise ood.tolerance (now {tolerance}) or lower ood.count"
        )
    return SampleResult(kept, drawn)


def separability(mean_a: torch.Tensor, mean_b: torch.Tensor) -> dict[str, float]:
    """Distance between two Gaussians' means against the separability scale d^¼."""
    d = mean_a.numel()
    dist = float((mean_a.to(F64) - mean_b.to(F64)).norm())
    return {"mean_distance": dist, "d": d, "d_quarter": d**0.25, "ratio": dist / d**0.25 if d else math.nan}
