"""Deterministic DDIM inversion and decoding (η = 0; Song et al. 2021, §4.3 / eq. 13).

Inversion walks the grid upward from x0: x_t = √ᾱ_t x̂0(x_p) + √(1−ᾱ_t) ε_θ(x_p, t),
with ε evaluated at the lower state — the usual approximation ε_θ(x_t, t) ≈ ε_θ(x_p, t),
which is why the reconstruction error is measured, not assumed (it falls with more steps).

``eps_at="lower"`` is the other common convention, the official Asyrp one: ε_θ(x_p, p) at the lower
timestep, x̂0 = (x_p − √(1−ᾱ_p) ε)/√ᾱ_p, x_t = √ᾱ_t x̂0 + √(1−ᾱ_t) ε, starting from x0 taken as the
state at the grid's lowest t (diffusion_latent.py:1029-1044 and :1248-1259; utils/diffusion_utils.py:84-92).
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim_step import predict_x0
from pipeline.diffusion.dpm import _check_shape
from pipeline.diffusion.latent import Latent
from pipeline.diffusion.sampling import denoise


def ddim_invert(den, x0: torch.Tensor, **kwargs) -> Latent:
    """Images (B,3,H,W) in [-1,1] → DDIM latent. Keyword arguments as ``ddim_invert_model_space``."""
    return ddim_invert_model_space(den, den.to_model_space(x0), **kwargs)


def ddim_decode(den, z: Latent, **kwargs) -> torch.Tensor:
    """DDIM latent → images (B,3,H,W) in [-1,1]."""
    return den.to_pixels(ddim_decode_model_space(den, z, **kwargs))


def inversion_grid(den, steps: int, strength: float = 1.0, t0: int | None = None) -> list[int]:
    """The descending grid an inversion walks: cut by ``strength``, or from ``t0`` (snapped to
    the grid, ``Schedule.grid_from``; the latent's ``timesteps[0]`` is the t0 used)."""
    if t0 is None:
        return den.schedule.grid(steps, strength)
    return den.schedule.grid_from(t0, steps)


@torch.no_grad()
def ddim_invert_model_space(
    den,
    x0: torch.Tensor,
    *,
    steps: int = 50,
    strength: float = 1.0,
    t0: int | None = None,
    condition=None,
    guidance_scale: float = 1.0,
    timesteps: list[int] | None = None,
    eps_at: str = "upper",
) -> Latent:
    """``timesteps`` (descending) overrides the grid that steps/strength/t0 would choose. ``eps_at``:
    "upper" (ε_θ(x_p, t), the default) or "lower" (ε_θ(x_p, p), official Asyrp; see the module doc)."""
    if timesteps is None:
        timesteps = inversion_grid(den, steps, strength, t0)
    x = x0.to(den.device, torch.float32)
    if eps_at == "lower":
        x = _invert_eps_at_lower(den, x, timesteps, condition, guidance_scale)
    elif eps_at == "upper":
        for step in reversed(den.schedule.steps_along(timesteps)):
            eps = den.eps(x, step.t, condition, guidance_scale)
            x0_hat = den.schedule.process_x0(predict_x0(x, eps, step.alpha_prev))
            x = step.alpha_t**0.5 * x0_hat + (1 - step.alpha_t) ** 0.5 * eps  # DDIM eq. 13, run upward
    else:
        raise ValueError(f"eps_at must be upper or lower, got {eps_at!r}")
    empty = x.new_zeros((x.shape[0], 0, *x.shape[1:]))
    return Latent(x_start=x, noise=empty, timesteps=timesteps, method="ddim", eta=0.0, source=den.source,
                  condition=condition)


def _invert_eps_at_lower(den, x: torch.Tensor, timesteps: list[int], condition, guidance_scale: float) -> torch.Tensor:
    """The official inversion loop (diffusion_latent.py:1034-1044): for (i, j) = (seq_next[1:], seq[1:]),
    i.e. each grid pair p < t upward from the lowest t, with x = x0 at p = the lowest t (no step from ᾱ = 1)."""
    den.schedule.check_timesteps(timesteps)
    upward = [int(t) for t in reversed(timesteps)]
    for p, t in zip(upward, upward[1:], strict=False):
        a_p, a_t = den.schedule.alpha(p), den.schedule.alpha(t)
        eps = den.eps(x, p, condition, guidance_scale)  # et = ε_θ(x_i, i) at the lower i (utils/diffusion_utils.py:46)
        x0_hat = den.schedule.process_x0(predict_x0(x, eps, a_p))  # x0_t = (x − √(1−a_i) et)/√a_i (:88)
        x = a_t**0.5 * x0_hat + (1 - a_t) ** 0.5 * eps  # √a_j x0_t + √(1−a_j) et (:92, η = 0)
    return x


@torch.no_grad()
def ddim_decode_model_space(den, z: Latent, *, condition=None, guidance_scale: float = 1.0) -> torch.Tensor:
    if z.method != "ddim":
        raise ValueError(f"ddim_decode needs a ddim latent, got method {z.method!r}; use dpm_decode")
    _check_shape(den, z)
    return denoise(den, z.x_start, z.timesteps, eta=0.0, condition=condition, guidance_scale=guidance_scale)
