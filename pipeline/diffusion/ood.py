"""Gaussian statistics of out-of-domain latents, their geometry, and geometric sampling
("Unseen Image Synthesis with Diffusion Models", seed 003).

OOD images DDIM-inverted to an intermediate t0 through a frozen single-domain model form a
Gaussian N(μ, σ²I) there, distinguishable from the in-domain one. We fit μ and σ² in one
streaming pass that merges across batches and actors, keep a bounded uniform reservoir of
latents, measure the geometry of that reservoir, and sample new latents from the Gaussian,
keeping those whose geometry against the reservoir matches what the data shows.

Two samplers. ``sample_latents`` (this project's first reading): Gaussian candidates kept within
``tolerance`` × the data's spread of its mean geometry. ``sample_candidates`` adds the official
one (DiscoveryDiff, github.com/L-YeZhu/DiscoveryDiff, ``unseen_sample`` in discovery.py): a
candidate is the slerp of a real inverted OOD latent with a Gaussian draw at a weight k/21, kept
when its mean distance and angles to 10 random references sit in tight windows; optionally a few
gradient steps toward the measured geometry first. Every candidate is a pure function of
(stats, run seed, index, settings), so any machine regenerates it from its index.

Pure torch on flattened latents (n, d), float64 throughout. No Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from pipeline.diffusion.noise import per_sample_noise, sample_seed

F64 = torch.float64


# ---- where the latents live ---------------------------------------------------------------


def ood_grid(schedule, t0: int, steps: int) -> list[int]:
    """A descending DDIM grid from (about) t0 down to the end, about ``steps`` long.

    The scheduler's own grid of round(steps · T / t0) steps over the whole range, from t0
    snapped to it (``Schedule.grid_from``: callers log when it moved). The official grid is
    int(linspace(0, 1, n_inv_step) · t_0) (DiscoveryDiff discovery.py:479-481), with defaults
    t_0 = 900 and n_inv_step = 80 (main.py:33-34): 80 points, 79 steps, inverted and decoded
    with DDIM η = 0 (main.py:38) and no x̂0 clipping (utils/diffusion_utils.py:113-115).
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
        """Population variance (ddof = 0) of the fitted latents, in one of three kinds:

          "diagonal"   per dimension, σ²_j = M2_j / n
          "isotropic"  the mean of the per-dimension variances, tr(Σ)/d (this project's scalar)
          "scalar"     the official estimator: one variance over all n·d entries around their
                       grand mean x̄, np.var(flattened_data) (DiscoveryDiff discovery.py:509)

        The official code samples with the per-dimension mean and this scalar variance,
        np.random.normal(mean_vector, sqrt(variance_scalar)) (DiscoveryDiff discovery.py:507,
        :512), which is ``draw_candidates(fit.mean, fit.variance("scalar"), …)``.
        """
        if self.count == 0:
            raise ValueError("no latents were fitted (empty input?)")
        var = self.m2 / self.count
        if kind == "diagonal":
            return var
        if kind == "isotropic":
            return var.mean().reshape(1)  # σ² = tr(Σ)/d
        if kind == "scalar":
            # Σ_ij (x_ij − x̄)² = Σ_j M2_j + n·Σ_j (μ_j − x̄)² with x̄ = mean_j μ_j, so the
            # official scalar is the isotropic one plus the spread of the per-dimension means,
            # exact from (count, mean, M2): it streams and merges like the other kinds.
            return (var.mean() + ((self.mean - self.mean.mean()) ** 2).mean()).reshape(1)
        raise ValueError(f"variance must be 'isotropic', 'diagonal' or 'scalar', got {kind!r}")


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
    """Indices of the first ``count`` Gaussian candidates within ``tolerance`` × the data's spread
    of its geometry (or all, without a reference): ``sample_candidates`` with its default settings.
    """
    if reference is not None and geometry is None:
        raise ValueError("geometric selection needs the measured geometry of the reference latents")
    settings = CandidateSettings(selection="tolerance" if reference is not None else "none", tolerance=tolerance)
    result = sample_candidates(OODStats(mean, variance, reference, geometry), count, run_seed=run_seed,
                               settings=settings, batch=batch, max_draws=max_draws)
    return SampleResult(result.indices, result.drawn)


def separability(mean_a: torch.Tensor, mean_b: torch.Tensor) -> dict[str, float]:
    """Distance between two Gaussians' means against the separability scale d^¼."""
    d = mean_a.numel()
    dist = float((mean_a.to(F64) - mean_b.to(F64)).norm())
    return {"mean_distance": dist, "d": d, "d_quarter": d**0.25, "ratio": dist / d**0.25 if d else math.nan}


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


@dataclass(frozen=True)
class GeometryWindow:
    """The official selection: a latent's mean statistics over ``references`` random references
    must lie this close to the data's (DiscoveryDiff discovery.py:540-575). The official targets
    are constants measured on its data (611.4, 88.0°, 60°); ours are ``measure_geometry``'s means,
    so the distance window is kept relative (0.3 / 611.4 ≈ 0.05 %)."""

    references: int = 10  # [random.randint(0, 999) for _ in range(10)], discovery.py:540
    distance: float = 0.3 / 611.4  # relative; abs(mean_dis - 611.4) <= 0.3, discovery.py:547
    angle_origin: float = 0.1  # degrees; abs(origin_angle - 88.0) <= 0.1, discovery.py:559
    angle_point: float = 0.1  # degrees; abs(pair_angle - 60) <= 0.1, discovery.py:570


def reference_pairs(seed: int, m: int, count: int, exclude: int = -1,
                    stream: str = "select") -> tuple[torch.Tensor, torch.Tensor]:
    """The references one latent is measured against: ``count`` indices i into the m references,
    drawn with replacement from the latent's own seed (random.randint, discovery.py:540), and the
    partner i + 1 of each for the angle at the latent (the official pair, discovery.py:566),
    wrapping at m (where the official code would index past its array). ``exclude`` (a slerp
    candidate's own source latent) is never drawn nor partnered. ``stream`` keeps the
    optimisation's references independent of the selection's."""
    if m < 3:
        raise ValueError(f"the window selection needs at least 3 reference latents, got {m}")
    g = torch.Generator().manual_seed(sample_seed(seed, f"ood-references/{stream}"))
    if exclude < 0:
        idx = torch.randint(0, m, (count,), generator=g)
    else:  # uniform over the m − 1 others: draw from m − 1 and step over the excluded index
        idx = torch.randint(0, m - 1, (count,), generator=g)
        idx = idx + (idx >= exclude).long()
    partner = (idx + 1) % m
    return idx, torch.where(partner == exclude, (idx + 2) % m, partner)


def _angle_between(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle between rows, degrees. Exact π: find_angle divides by 3.14159 (discovery.py:84), a
    bias of 7·10⁻⁵° at 88°, far inside the 0.1° window."""
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def window_statistics(x: torch.Tensor, reference: torch.Tensor, idx: torch.Tensor,
                      partner: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each latent's official statistics against its own references (idx, partner: (n, R)):

      distance      mean_i ‖x − r_i‖                  discovery.py:543-546
      angle_origin  mean_i ∠(x, r_i) at the origin    find_angle(origin, x, r_i), discovery.py:553-557
      angle_point   mean_i ∠(r_i − x, r_i' − x) at x  find_angle(x, r_i, r_i+1), discovery.py:565-569

    One row at a time, vectorised over its references: memory stays R·d, a row's numbers never
    depend on the batch around it, and it is differentiable, for ``optimise_latents``.
    """
    x = x.reshape(x.shape[0], -1).to(F64)
    ref = reference.reshape(reference.shape[0], -1)
    rows = []
    for j in range(x.shape[0]):
        r, r_next = ref[idx[j]].to(F64), ref[partner[j]].to(F64)  # (R, d) each
        u, v = r - x[j], r_next - x[j]
        rows.append(torch.stack([u.norm(dim=1).mean(), _angle_between(x[j], r).mean(), _angle_between(u, v).mean()]))
    s = torch.stack(rows) if rows else x.new_zeros((0, 3))
    return {"distance": s[:, 0], "angle_origin": s[:, 1], "angle_point": s[:, 2]}


def within_window(stats: dict[str, torch.Tensor], geometry: dict[str, float], window: GeometryWindow) -> torch.Tensor:
    """Rows whose three statistics all lie in the window around the measured means (discovery.py:575)."""
    target = geometry["distance_mean"]
    ok = (stats["distance"] - target).abs() <= window.distance * target
    ok &= (stats["angle_origin"] - geometry["angle_origin_mean"]).abs() <= window.angle_origin
    ok &= (stats["angle_point"] - geometry["angle_point_mean"]).abs() <= window.angle_point
    return ok


def calibrate_window(reference: torch.Tensor, geometry: dict[str, float], coverage: float = 0.9,
                     references: int = 10, seed: int = 0) -> GeometryWindow:
    """Windows that let ``coverage`` of the reference latents themselves pass on each statistic
    (jointly at least 1 − 3·(1 − coverage)), each measured against ``references`` of the others.
    The official windows fit the official data (d = 3·256·256); at small d a 10-reference mean
    fluctuates more than 0.05 % and they reject real latents too. In-sample: check the result
    on held-out latents with ``acceptance_rate``."""
    m = reference.shape[0]
    pairs = [reference_pairs(sample_seed(seed, f"ood-calibrate/{i}"), m, references, exclude=i) for i in range(m)]
    idx, partner = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    s = window_statistics(reference, reference, idx, partner)

    def spread(values: torch.Tensor) -> float:
        return float(torch.quantile(values.abs(), coverage))

    return GeometryWindow(references, spread(s["distance"] / geometry["distance_mean"] - 1),
                          spread(s["angle_origin"] - geometry["angle_origin_mean"]),
                          spread(s["angle_point"] - geometry["angle_point_mean"]))


def geometric_loss(x: torch.Tensor, reference: torch.Tensor, idx: torch.Tensor, partner: torch.Tensor,
                   geometry: dict[str, float]) -> torch.Tensor:
    """Per row, the misfit of its statistics to the measured geometry in scale-free units:
    ((D − D*)/D*)² + Δθ_origin² + Δθ_point² (angles in radians)."""
    s = window_statistics(x, reference, idx, partner)
    distance = s["distance"] / geometry["distance_mean"] - 1
    origin = torch.deg2rad(s["angle_origin"] - geometry["angle_origin_mean"])
    point = torch.deg2rad(s["angle_point"] - geometry["angle_point_mean"])
    return distance**2 + origin**2 + point**2


def optimise_latents(x: torch.Tensor, reference: torch.Tensor, idx: torch.Tensor, partner: torch.Tensor,
                     geometry: dict[str, float], steps: int = 10, lr: float = 0.25) -> torch.Tensor:
    """``steps`` plain gradient steps on ``geometric_loss``: each latent moves toward the measured
    mean distance and angles (the abstract's "geometric optimization"; the official code only
    filters). Steps are taken on y = x / D*, where the terms' gradients are of order one whatever
    the latent size: gradient descent is stable for lr < 1/|∇|², and |∇θ_origin| = D*/‖x‖ ≲ √2
    there (‖x‖² ≥ D*²/2 when x is as far from the data as the data is from itself), so lr < 0.5;
    the default 0.25 keeps a factor 2. Deterministic, rows independent."""
    scale = float(geometry["distance_mean"])
    y = x.reshape(x.shape[0], -1).to(F64) / scale
    for _ in range(steps):
        y = y.detach().requires_grad_(True)
        loss = geometric_loss(y * scale, reference, idx, partner, geometry).sum()
        (grad,) = torch.autograd.grad(loss, y)
        y = y - lr * grad
    return (y * scale).detach()


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
