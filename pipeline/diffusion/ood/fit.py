"""Streaming statistics of inverted OOD latents: where they live (the t0 grid), their moments
(mergeable across batches and actors) and a bounded uniform reservoir of them.

Pure torch on flattened latents (n, d), float64 throughout. No Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.diffusion.noise import sample_seed

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
