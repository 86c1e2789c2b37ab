"""The timestep grid and ᾱ table shared by every sampler and encoder.

Notation (docs/maths.md, "The grid"): a grid τ_S > … > τ_1 from the model scheduler's own
``set_timesteps(S)``; ``strength`` keeps its last ⌊s·S⌋ steps (at least one), as
diffusers' img2img pipelines do. A step leaves t for p, the next timestep on the grid;
the last step ends at the scheduler's final ᾱ (1 with ``set_alpha_to_one``, else ᾱ_0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Step:
    """One move t → p on the grid, with everything the DDIM family needs."""

    t: int
    alpha_t: float  # ᾱ_t
    alpha_prev: float  # ᾱ_p
    is_last: bool


@dataclass(frozen=True)
class Schedule:
    """ᾱ table plus the rules to cut grids from it; built from a diffusers scheduler config."""

    alphas_cumprod: torch.Tensor  # float64, (num_train_timesteps,)
    final_alpha_cumprod: float
    full_grid_fn: object  # callable(steps) -> list[int], the scheduler's own set_timesteps
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def grid(self, steps: int, strength: float = 1.0) -> list[int]:
        """The descending grid for ``steps``, cut to its last ⌊strength·steps⌋ entries."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        full = [int(t) for t in self.full_grid_fn(steps)]
        keep = max(1, min(int(steps * strength), len(full)))  # diffusers img2img: int(S·s)
        return full[len(full) - keep :]

    def steps_along(self, timesteps: list[int]) -> list[Step]:
        """The moves of a descending grid: each t goes to the next grid entry, the last to the end."""
        self.check_timesteps(timesteps)
        out = []
        for i, t in enumerate(timesteps):
            last = i == len(timesteps) - 1
            a_p = self.final_alpha_cumprod if last else self.alpha(timesteps[i + 1])
            out.append(Step(t=int(t), alpha_t=self.alpha(t), alpha_prev=a_p, is_last=last))
        return out

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[int(t)])

    def check_timesteps(self, timesteps: list[int]) -> None:
        if len(timesteps) == 0:
            raise ValueError("a latent needs at least one timestep")
        n = self.num_train_timesteps
        bad = [t for t in timesteps if not 0 <= int(t) < n]
        if bad:
            raise ValueError(
                f"timesteps {bad} are outside this model's table of {n} training timesteps; "
                "encode and decode with models trained on the same noise schedule"
            )
        if any(a <= b for a, b in zip(timesteps, timesteps[1:], strict=False)):
            raise ValueError(f"timesteps must be strictly descending, got {list(timesteps)}")

    def snap(self, t0: int, steps: int) -> int:
        """The grid timestep nearest to ``t0`` (for callers that name t0 directly)."""
        full = self.grid(steps)
        return min(full, key=lambda t: (abs(t - t0), t))

    def grid_from(self, t0: int, steps: int) -> list[int]:
        """The ``steps``-step grid from t0 down: the one t0 policy of the project.

        A t0 off the grid is snapped to the nearest grid timestep (the lower on a tie); the
        returned grid's first entry is the t0 actually used, and callers record both.
        """
        if not 0 <= t0 < self.num_train_timesteps:
            raise ValueError(f"t0 = {t0} must lie in 0..{self.num_train_timesteps - 1} (the model's training timesteps)")
        full = self.grid(steps)
        return full[full.index(self.snap(t0, steps)) :]

    def with_x0_clip(self, mode: str) -> Schedule:
        """``sampler.clip_x0``: "auto" keeps the scheduler config's clip_sample / thresholding;
        "off" never touches x̂0, as the official CycleDiffusion and DiscoveryDiff code
        (cycle-diffusion model/lib/ddpm_ddim/utils/diffusion_utils.py:122, x0_t unclipped);
        "on" clamps it to ±clip_sample_range (pixel models: images live in [-1, 1])."""
        if mode == "auto":
            return self
        if mode == "off":
            return replace(self, clip_sample=False, thresholding=False)
        if mode == "on":
            return replace(self, clip_sample=True, thresholding=False)
        raise ValueError(f"clip_x0 must be auto, on or off, got {mode!r}")

    def process_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The scheduler's clip_sample / dynamic thresholding of x̂0, applied identically everywhere."""
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3), per sample."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.float(), ratio, dim=1).to(x0.dtype)
    s = s.clamp(min=1.0, max=max_value).view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


def ddim_sigma(eta: float, alpha_t: float, alpha_prev: float) -> float:
    """σ_t = η √((1−ᾱ_t/ᾱ_p)(1−ᾱ_p)/(1−ᾱ_t))  (DDIM, Song et al. 2021, eq. 16)."""
    return eta * math.sqrt(max(0.0, (1 - alpha_t / alpha_prev) * (1 - alpha_prev) / (1 - alpha_t)))


def schedule_from_scheduler(scheduler) -> Schedule:
    """Build a Schedule from any diffusers scheduler sharing DDPM's β configuration."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    cfg = ddim.config

    def full_grid(steps: int, _ddim=ddim) -> list[int]:
        _ddim.set_timesteps(steps)
        return [int(t) for t in _ddim.timesteps]

    return Schedule(
        alphas_cumprod=ddim.alphas_cumprod.to(torch.float64).clone(),
        final_alpha_cumprod=float(ddim.final_alpha_cumprod),
        full_grid_fn=full_grid,
        clip_sample=bool(cfg.get("clip_sample", False)),
        clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        thresholding=bool(cfg.get("thresholding", False)),
        dynamic_thresholding_ratio=float(cfg.get("dynamic_thresholding_ratio", 0.995)),
        sample_max_value=float(cfg.get("sample_max_value", 1.0)),
    )
