"""h-space editing (Asyrp: Kwon, Jeong & Uh, "Diffusion Models Already Have a Semantic Latent
Space", ICLR 2023; seed 001).

h is the output of the U-Net's middle block (``unet.mid_block``, for UNet2DModel and
UNet2DConditionModel alike). An edit replaces h by h + s·Δh and sends it up the decoder with the
*original* skip connections: a forward hook on the mid block changes only what the mid block
returns, so the down path and its skips are untouched.

Asymmetric reverse process (Asyrp eq. 4, official utils/diffusion_utils.py:84-97): for t ≥ t_edit

    x_p = √ᾱ_p · x̂0(ε̃) + √(1−ᾱ_p−σ²) · ε + σ n,   ε̃ = ε_θ(x_t | h + Δh),  ε = ε_θ(x_t | h),

then plain DDIM down to the end; σ = 0 (η = 0) for t ≥ t_boost and η = 1 for t < t_boost ("quality
boosting"), inside the edit range too: the official edit loop sets ``eta=1.0 if t[0] < self.t_addnoise``
for every step (diffusion_latent.py:513), and denoising_step takes x0_t from the modified ε whatever
η is (utils/diffusion_utils.py:85-97). Both ε come from one network call: the batch is doubled and
the hook edits its second half.

Grids (``hspace_grid``): the model scheduler's own, or the official ``linspace`` grid, whose last step
ends at ᾱ = 1 (``grid_schedule``).

Δh is a ``TableDirection`` (a tensor per timestep: the difference of mean h between two example
sets, or a free Δh) or a ``DeltaBlock`` f_t(h, t) (official models/ddpm/diffusion.py:228-263).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from pipeline.diffusion.ddim_step import generative_mean, predict_x0
from pipeline.diffusion.noise import NoiseSource, default_seeds
from pipeline.diffusion.sampling import mean_from_eps
from pipeline.diffusion.schedule import Schedule, Step, ddim_sigma

# Δh(h, temb, t) for the rows being edited: h (n, C, h, w), temb (n, D) the U-Net's own timestep embedding
DeltaFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


# ---- where h lives -----------------------------------------------------------------------


def mid_block(unet: nn.Module) -> nn.Module:
    """The U-Net's middle block (through a torch.compile wrapper)."""
    module = getattr(unet, "_orig_mod", unet)
    block = getattr(module, "mid_block", None)
    if block is None:
        raise ValueError(f"{type(module).__name__} has no mid_block: h-space editing needs a diffusers U-Net "
                         "with a middle block (UNet2DModel or UNet2DConditionModel)")
    return block


def h_channels(unet: nn.Module) -> int:
    """Channels of h: the last resnet of the mid block's output."""
    return int(mid_block(unet).resnets[-1].conv2.out_channels)


def temb_channels(unet: nn.Module) -> int:
    """Width of the timestep embedding the mid block receives (what a DeltaBlock projects)."""
    return int(mid_block(unet).resnets[0].time_emb_proj.in_features)


class MidBlockHook:
    """A forward hook on the mid block: ``edit`` replaces h of rows [start:] by h + s_i·Δh(h, temb, t);
    ``record`` keeps the h every call returns (float32). Use as a context manager; nothing stays hooked."""

    def __init__(self, unet: nn.Module):
        self.block = mid_block(unet)
        self.delta: DeltaFn | None = None
        self.scales: torch.Tensor | None = None  # (n_edit,)
        self.start = 0
        self.t = 0
        self.record = False
        self.recorded: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> MidBlockHook:
        self._handle = self.block.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs, h):
        if self.record:
            self.recorded.append(h.detach().float())
        if self.delta is None:
            return None
        temb = args[1] if len(args) > 1 else kwargs["temb"]
        rows = h[self.start :]
        scales = self.scales.to(rows.device, rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
        edited = rows + scales * self.delta(rows, temb[self.start :], self.t).to(rows.dtype)
        return torch.cat([h[: self.start], edited])


# ---- Δh ----------------------------------------------------------------------------------


@dataclass
class TableDirection:
    """Δh as one tensor per timestep (``deltas[k]`` at ``timesteps[k]``), used at the nearest fitted
    timestep: a mean difference of h between two example sets, or a free Δh."""

    timesteps: list[int]
    deltas: torch.Tensor  # (K, C, h, w)

    def __call__(self, h: torch.Tensor, temb: torch.Tensor, t: int) -> torch.Tensor:
        k = min(range(len(self.timesteps)), key=lambda i: (abs(self.timesteps[i] - t), self.timesteps[i]))
        return self.deltas[k].to(h.device, h.dtype).expand_as(h)


def _group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    # official Normalize: GroupNorm(32, C, eps=1e-6, affine=True) (models/ddpm/diffusion.py); fewer
    # groups where C is not a multiple of 32 (small models)
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps, affine=True)


def uses_scale_shift_norm(unet: nn.Module) -> bool:
    """An ADM / improved-DDPM U-Net (its resnets scale and shift their norm by the timestep embedding:
    ``use_scale_shift_norm``, which every published ADM checkpoint has), as opposed to a DDPM one."""
    module = getattr(unet, "_orig_mod", unet)
    return getattr(getattr(module, "config", None), "resnet_time_scale_shift", "default") == "scale_shift"


class DeltaBlock(nn.Module):
    """f_t(h, t): 1×1 conv, + a linear projection of SiLU(temb), GroupNorm, SiLU, 1×1 conv
    (official DeltaBlock, models/ddpm/diffusion.py:228-263; the edit is h + 1.0·f_t, diffusion.py:513-516).

    ``pre_norm`` (ADM / improved-DDPM U-Nets): Asyrp's DeltaBlock of models/improved_ddpm/unet.py:776-855,
    built at :769-773 without scale-shift norm, puts GroupNorm and SiLU before the first conv (its
    ``in_layers``), and its norms are guided-diffusion's ``normalization`` (GroupNorm32: eps 1e-5)."""

    def __init__(self, channels: int, temb_channels: int, pre_norm: bool = False):
        super().__init__()
        eps = 1e-5 if pre_norm else 1e-6
        self.norm1 = _group_norm(channels, eps) if pre_norm else None
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.temb_proj = nn.Linear(temb_channels, channels)
        self.norm2 = _group_norm(channels, eps)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=1)

    @classmethod
    def for_unet(cls, unet: nn.Module) -> DeltaBlock:
        return cls(h_channels(unet), temb_channels(unet), pre_norm=uses_scale_shift_norm(unet))

    def forward(self, h: torch.Tensor, temb: torch.Tensor, t: int | None = None) -> torch.Tensor:
        w = self.conv1.weight
        x = h.to(w.dtype)
        if self.norm1 is not None:
            x = nn.functional.silu(self.norm1(x))
        x = self.conv1(x) + self.temb_proj(nn.functional.silu(temb.to(w.dtype)))[:, :, None, None]
        return self.conv2(nn.functional.silu(self.norm2(x)))


# ---- grids --------------------------------------------------------------------------------


def linspace_grid(t0: int, steps: int) -> list[int]:
    """The official grid, descending: ``[int(s + 1e-6) for s in np.linspace(0, 1, n) * t_0]``
    (diffusion_latent.py:570-573, the same at :154-156 and :955-956), t0 itself first and 0 last.
    The float expression is kept as is: it decides the ints (999 steps to 999 leave out 998, as the
    released utils/*_LPIPS_*.tsv do). A repeated t (more steps than t0 + 1) is dropped: the official step
    t → t has ᾱ_t = ᾱ_next, the identity for any η (c1 = 0, utils/diffusion_utils.py:92-97)."""
    if steps < 2:
        raise ValueError(f"hspace.grid: linspace needs at least 2 steps (t0 and 0), got {steps}")
    seq = [int(s + 1e-6) for s in np.linspace(0, 1, steps) * t0]
    return sorted(set(seq), reverse=True)


def hspace_grid(schedule: Schedule, t0: int, steps: int, kind: str = "schedule") -> list[int]:
    """The grid of inversion, fit and edit: the scheduler's ``steps``-step grid from t0 snapped onto it
    (``schedule``), or the official ``linspace`` grid from t0 exactly."""
    if kind == "linspace":
        grid = linspace_grid(t0, steps)
        schedule.check_timesteps(grid)
        return grid
    if kind != "schedule":
        raise ValueError(f"hspace.grid must be schedule or linspace, got {kind!r}")
    return schedule.grid_from(t0, steps)


def grid_schedule(schedule: Schedule, kind: str = "schedule") -> Schedule:
    """The ᾱ table a grid walks with: the linspace grid's last step (t = 0) ends at ᾱ = 1, as the official
    t_next = −1 (utils/diffusion_utils.py:68-69 ``at_next = 1``); the scheduler's grid at its own final ᾱ."""
    return replace(schedule, final_alpha_cumprod=1.0) if kind == "linspace" else schedule


# ---- the asymmetric reverse process --------------------------------------------------------


def asymmetric_step(den, x_t: torch.Tensor, step: Step, eps: torch.Tensor, eps_edit: torch.Tensor,
                    sigma: float = 0.0) -> torch.Tensor:
    """The mean √ᾱ_p x̂0(ε̃) + √(1−ᾱ_p−σ²) ε (Asyrp eq. 4; the caller adds σ n): x̂0 from the edited ε̃
    (utils/diffusion_utils.py:86 x0_t from et_modified), the direction from the original ε (:92 with η = 0,
    :95-97 c2·et with η > 0)."""
    x0_hat = den.schedule.process_x0(predict_x0(x_t, eps_edit, step.alpha_t))
    return generative_mean(x0_hat, eps, step.alpha_prev, sigma)


def eps_with_edit(den, x_t: torch.Tensor, t: int, delta: DeltaFn, scales: torch.Tensor, condition=None,
                  guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_θ(x_t | h), ε_θ(x_t | h + s·Δh)) in one network call: the batch doubled, the hook editing its
    second half (with guidance, both branches of each edited row carry the edit)."""
    guided = guidance_scale != 1.0 and den.conditioning != "none"
    reps = 2 if guided else 1
    with MidBlockHook(den.unet) as hook:
        hook.delta, hook.t, hook.start = delta, int(t), reps * x_t.shape[0]
        hook.scales = scales.repeat(reps) if guided else scales  # eps_many puts [uncond; cond] per part
        eps, eps_edit = den.eps_many(t, [(x_t, condition, guidance_scale), (x_t, condition, guidance_scale)])
    return eps, eps_edit


@dataclass(frozen=True)
class EditSchedule:
    """Where each part of the reverse process runs: Δh for t ≥ t_edit, η = 1 for t < t_boost (both may
    hold at one step when t_boost > t_edit)."""

    t_edit: int
    t_boost: int
    grid_scale: float = 1.0  # Δh multiplier: fit grid / edit grid (official diffusion_latent.py:626)

    def eta_at(self, t: int) -> float:
        return 1.0 if t < self.t_boost else 0.0  # diffusion_latent.py:513 ``eta=1.0 if t[0] < self.t_addnoise``


@torch.no_grad()
def edit_walk(
    den,
    x_start: torch.Tensor,
    timesteps: Sequence[int],
    delta: DeltaFn,
    scales: Sequence[float],
    schedule: EditSchedule,
    *,
    seeds: Sequence[int] | None = None,
    condition=None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Edit inverted latents x_start (B, …) at t = timesteps[0]: one output per (scale, sample),
    scale-major: rows [j·B : (j+1)·B] are scale j. Returns x0 in model space, float32.

    Samples keep their seed across scales, so the boosting noise is the same for every scale of a
    sample and outputs differ by the edit alone.
    """
    b = x_start.shape[0]
    seeds = list(seeds) if seeds is not None else default_seeds(b)
    if len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {b}")
    x = x_start.to(den.device, torch.float32).repeat(len(scales), *([1] * (x_start.dim() - 1)))
    row_scales = torch.tensor([s * schedule.grid_scale for s in scales for _ in range(b)], device=den.device)
    noise, shape = NoiseSource(seeds * len(scales), den.device, "boost"), tuple(x.shape[1:])
    for i, step in enumerate(den.schedule.steps_along(list(timesteps))):
        # c1 = η √((1 − ᾱ_t/ᾱ_p)(1 − ᾱ_p)/(1 − ᾱ_t))  (utils/diffusion_utils.py:95), at every step
        sigma = ddim_sigma(schedule.eta_at(step.t), step.alpha_t, step.alpha_prev)
        if step.t >= schedule.t_edit:
            eps, eps_edit = eps_with_edit(den, x, step.t, delta, row_scales, condition, guidance_scale)
            x = asymmetric_step(den, x, step, eps, eps_edit, sigma)
        else:  # below t_edit the official model returns et_modified = et (models/ddpm/diffusion.py:541-542)
            x = mean_from_eps(den, x, den.eps(x, step.t, condition, guidance_scale), step, sigma)
        if sigma > 0:  # + c1 · noise (utils/diffusion_utils.py:97)
            x = x + sigma * noise.draw(i, shape)
    return x


# ---- h along the reverse process (direction fits, t_edit / t_boost) -------------------------


@dataclass
class HTrace:
    """What a deterministic DDIM walk saw at each of its timesteps (the walk's order, descending)."""

    timesteps: list[int]
    h: torch.Tensor  # (B, K, C, h, w) float32: h of each step's network call (the conditional branch when guided)
    x0_hat: list[torch.Tensor]  # K × (B, …) model space: x̂0 at each step
    x_t: list[torch.Tensor]  # K × (B, …) model space: the state each step leaves from


@torch.no_grad()
def trace_h(den, x_start: torch.Tensor, timesteps: Sequence[int], condition=None, guidance_scale: float = 1.0,
            keep_states: bool = False) -> HTrace:
    """The DDIM (η = 0) reverse walk from x_start, recording h at each step: the walk an edit at scale 0
    takes, so its h is the h an edit changes."""
    x = x_start.to(den.device, torch.float32)
    b = x.shape[0]
    hs, x0s, xts = [], [], []
    with MidBlockHook(den.unet) as hook:
        hook.record = True
        for step in den.schedule.steps_along(list(timesteps)):
            hook.recorded.clear()
            eps = den.eps(x, step.t, condition, guidance_scale)
            hs.append(hook.recorded[-1][-b:])  # guided: [uncond; cond] in one call, keep cond
            if keep_states:
                xts.append(x)
                x0s.append(den.schedule.process_x0(predict_x0(x, eps, step.alpha_t)))
            x = mean_from_eps(den, x, eps, step, 0.0)
    return HTrace(list(timesteps), torch.stack(hs, 1), x0s, xts)


def first_timestep_reaching(timesteps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """The smallest t whose value reaches ``threshold``, scanning t upward (official
    diffusion_latent.py:1373-1376 for t_edit, :1402-1405 for t_boost); None if none does (the official
    code then fails on an unbound t_edit / t_addnoise: the caller says which setting to change)."""
    for t, v in sorted(zip(timesteps, values, strict=True)):
        if v >= threshold:
            return int(t)
    return None
