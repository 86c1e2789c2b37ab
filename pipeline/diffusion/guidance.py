"""Guidance in latent space (CycleDiffusion: Wu & De la Torre, arXiv 2210.05559, the guidance section;
seeds 000/002, seed 002 lines 81-99): Langevin dynamics on the latent z of a frozen model.

The guided distribution is the energy-based model p(x | c) ∝ p(x)·exp(−λ E(x | c)). With x = G(z) and
z ~ N(0, I) it is sampled in z, where the prior is a plain Gaussian:

    U(z)  = ½‖z‖² + λ·E(G(z) | c)                       (−log p(z | c) up to a constant)
    z ← z − (s/2)·∇_z U(z) + √s·n,   n ~ N(0, I)         (Langevin; the paper: s = 0.05, 200 steps, seed 002 l. 93-95)

G is a decoder from pure noise (strength 1), in one of the two forms of the official guidance code
(ChenWu98/unified-generative-zoo, cited as zoo FILE:LINE):
- η > 0, a DPM latent: the generative stochastic DDIM walk driven by z = (x_T, ε_{τ_S}, …, ε_{τ_1})
  (docs/maths.md, "DPM-Encoder"; dpm.py), as the zoo's DDPM-latent runs (config/experiments/
  class_*_celeba64_sn_dpm_ddpm_langevin.cfg: one grid, sample_steps, for the chain and the output);
- η = 0, a DDIM latent: z = x_T alone and G the deterministic DDIM walk, as the zoo's LDM runs
  (model/gan_wrapper/latentdiff_wrapper.py: eta '0' at :24, x_T = z.view(…) at :212). There the chain's
  G walks a short grid and the output image a long one: the wrapper is in train() mode inside the
  Langevin chain and eval() for the final image (model/langevin_dynamics.py:120-123), and generate()
  picks custom_steps_train or custom_steps by that mode (latentdiff_wrapper.py:204-209). Here:
  ``chain_timesteps`` for the chain, the latent's own grid for the output. x_T is the state at each
  grid's first timestep, whichever grid, as there (the same tensor enters both samplers).
½‖z‖² is the official prior energy (zoo model/energy/prior_z.py:14-20, ½ Σ z² per sample).

Decisions where the paper is silent (each also said where it is made):
- A grid step with σ_t = 0 (the last one, when the scheduler's final ᾱ is 1) takes no noise in G, so its
  slot of z drives nothing. It is held at 0, not sampled: it is not a variable of z. Zero is also what
  the DPM-Encoder's convention needs there (that slot holds a residual, replayed only by a
  reconstruction), so decoding a stored guided latent gives the guided image whichever way it is read.
- Noise: z⁽⁰⁾ and every Langevin n come from ``NoiseSource`` on streams of their own ("guide-init",
  "langevin"), so a sample's whole chain depends on its seed alone, never on its batch.
- The chain returns z⁽ⁿ⁾ itself (no extra final step, no averaging), as the update above defines it
  and the zoo does without a ``metric`` (its configs for CLIP set none; langevin_dynamics.py:126-127).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from pipeline.diffusion.latent import Latent
from pipeline.diffusion.noise import NoiseSource, default_seeds, sample_seed
from pipeline.diffusion.sampling import innovation_scale, step_mean
from pipeline.diffusion.schedule import Step, ddim_sigma

INIT_STREAM = "guide-init"  # z⁽⁰⁾ = (x_T, ε_1 … ε_K): maps 0 … K of this stream
LANGEVIN_STREAM = "langevin"  # n⁽ᵏ⁾ of Langevin step k: map k of this stream, shaped like all of z

# energy_fn(x0, keys) -> (B,): x0 = G(z) in the model's space, keys = per-sample augmentation seeds
EnergyFn = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass
class GuideResult:
    """The end of a chain: z⁽ⁿ⁾, its image G(z⁽ⁿ⁾) (model space) and the energies along the way."""

    z: Latent  # detached, on the output grid
    x0: torch.Tensor  # (B, C, h, w), G(z⁽ⁿ⁾) on the output grid, detached
    # (n + 1, B): E(G(z⁽ᵏ⁾) | c), not times λ, for k = 0 … n − 1 on the chain's grid and, last, of the output
    # x0 (as the zoo's forward measures its final losses on the eval-mode image, langevin_dynamics.py:142-146);
    # NaN where λ = 0 skipped it
    energy: torch.Tensor
    prior: torch.Tensor  # (n + 1, B): ½‖z⁽ᵏ⁾‖²


def prior_energy(z: Latent) -> torch.Tensor:
    """½‖z‖² per sample over x_T and every ε: −log N(z; 0, I) up to a constant (prior_z.py:14-20)."""
    b = z.x_start.shape[0]
    return 0.5 * (z.x_start.reshape(b, -1).pow(2).sum(1) + z.noise.reshape(b, -1).pow(2).sum(1))


def live_steps(den, timesteps: Sequence[int], eta: float) -> list[bool]:
    """Which grid steps take noise in G: σ_t > 0 (a σ_t = 0 step's slot of z is held at 0)."""
    return [ddim_sigma(eta, s.alpha_t, s.alpha_prev) > 0 for s in den.schedule.steps_along(list(timesteps))]


def initial_latent(den, shape: Sequence[int], *, steps: int, eta: float, seeds: Sequence[int],
                   condition=None) -> Latent:
    """z⁽⁰⁾ ~ N(0, I) on ``den.schedule.grid(steps)`` (strength 1: G starts from pure noise).

    η > 0: a DPM latent, x_T (map 0) and ε of grid step i (map i + 1) of each sample's "guide-init"
    stream; slots of σ = 0 steps are 0. η = 0: a DDIM latent, z = x_T alone (map 0; latentdiff_wrapper.py:212).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (got {eta})")
    timesteps = den.schedule.grid(steps, 1.0)
    noise, shape = NoiseSource(seeds, den.device, INIT_STREAM), tuple(shape)
    if eta == 0:
        x_t = noise.draw(0, shape)
        return Latent(x_start=x_t, noise=x_t.new_zeros((len(seeds), 0, *shape)), timesteps=timesteps, method="ddim",
                      eta=0.0, seeds=[int(s) for s in seeds], source=den.source, condition=condition)
    live = live_steps(den, timesteps, eta)
    eps = [noise.draw(i + 1, shape) if on else torch.zeros((len(seeds), *shape), device=den.device)
           for i, on in enumerate(live)]
    return Latent(x_start=noise.draw(0, shape), noise=torch.stack(eps, 1), timesteps=timesteps, method="dpm",
                  eta=float(eta), seeds=[int(s) for s in seeds], source=den.source, condition=condition)


def _g_step(den, x: torch.Tensor, eps_t: torch.Tensor | None, step: Step, sigma: float, condition, guidance_scale):
    """One generative step x_p = μ_θ(x_t) + σ_t ε_t (σ_t = 0 or no ε_t: deterministic; sampling.denoise's step)."""
    mean = step_mean(den, x, step, sigma, condition, guidance_scale)
    return mean if eps_t is None else mean + innovation_scale(sigma) * eps_t


def generate(den, z: Latent, condition=None, guidance_scale: float = 1.0, checkpoint: bool = False) -> torch.Tensor:
    """G(z): x_T = z.x_start walked down z.timesteps, step i adding σ_i·z.noise[:, i]; model space, float32.
    A DDIM latent (no noise maps, η = 0) walks deterministically.

    Differentiable in z (no no_grad: the weights are frozen, so the graph reaches z alone). The same walk
    as ``dpm_decode_model_space`` with ``reconstruct=False`` (``ddim_decode_model_space`` for a DDIM
    latent). With ``checkpoint`` each step is recomputed in the backward pass (torch.utils.checkpoint), so
    the graph holds the K step inputs, not K UNets' activations: memory of one step, for one more forward
    pass per step.
    """
    x = z.x_start.to(den.device, torch.float32)
    noise = z.noise.to(den.device, torch.float32) if z.noise.shape[1] else None
    eta = z.eta if z.method == "dpm" else 0.0
    for i, step in enumerate(den.schedule.steps_along(z.timesteps)):
        sigma = ddim_sigma(eta, step.alpha_t, step.alpha_prev)
        eps = None if noise is None else noise[:, i]
        if checkpoint and torch.is_grad_enabled():
            x = _checkpoint(_g_step, den, x, eps, step, sigma, condition, guidance_scale, use_reentrant=False)
        else:
            x = _g_step(den, x, eps, step, sigma, condition, guidance_scale)
    return x


def langevin_step(z: torch.Tensor, grad: torch.Tensor, step_size: float, noise: torch.Tensor) -> torch.Tensor:
    """z − (s/2)·∇U(z) + √s·n, with ``grad`` = ∇U(z) (seed 002 line 93, σ there = s here)."""
    return z - (step_size / 2) * grad + step_size**0.5 * noise


def augment_keys(seeds: Sequence[int], step: int) -> list[int]:
    """Per-sample seeds of the energy's augmentations at Langevin step ``step`` (own to each sample)."""
    return [sample_seed(int(s), f"augment/{step}") for s in seeds]


def chain_grid(z0: Latent, chain_timesteps: Sequence[int] | None) -> list[int]:
    """The grid G walks inside the chain: ``chain_timesteps``, or the latent's own. Only a DDIM latent
    (z = x_T) can change it: a DPM latent holds one noise map per step of its grid, so another grid
    would need another z (the zoo's DDPM-latent wrapper has one grid, sample_steps, for both)."""
    if chain_timesteps is None or list(chain_timesteps) == list(z0.timesteps):
        return list(z0.timesteps)
    if z0.method != "ddim":
        raise ValueError("a chain grid other than the latent's needs a DDIM latent (eta 0, z = x_T): "
                         f"this {z0.method} latent holds one noise map per step of its {len(z0.timesteps)}-step grid")
    return [int(t) for t in chain_timesteps]


def guide(den, z0: Latent, energy_fn: EnergyFn, *, steps: int, step_size: float, weight: float,
          seeds: Sequence[int] | None = None, condition=None, guidance_scale: float = 1.0,
          checkpoint: bool = True, chain_timesteps: Sequence[int] | None = None) -> GuideResult:
    """``steps`` Langevin steps on U(z) = ½‖z‖² + λ·E(G(z) | c) from ``z0``; returns z⁽ⁿ⁾ and G(z⁽ⁿ⁾).

    ``energy_fn(x0, keys)`` → (B,) takes G(z) in the model's space (the caller decodes to pixels) and
    the step's per-sample augmentation keys. Each sample's U depends on that sample alone, so ∇ of
    the batch sum is every sample's own gradient. λ = 0 skips G: the chain then samples the prior, and
    the energies before the last are NaN (not measured). Inside the chain G walks ``chain_timesteps``
    (a DDIM latent only; None: z0's grid, ``chain_grid``); the output x0 is G on z0's grid, the zoo's
    custom_steps_train / custom_steps (latentdiff_wrapper.py:204-209).
    """
    seeds = list(seeds) if seeds is not None else (list(z0.seeds) or default_seeds(len(z0)))
    if len(seeds) != len(z0):
        raise ValueError(f"got {len(seeds)} seeds for a batch of {len(z0)}")
    chain = chain_grid(z0, chain_timesteps)
    live = live_steps(den, z0.timesteps, z0.eta) if z0.method == "dpm" else []  # a DDIM latent: x_T alone
    mask = torch.tensor([1.0, *map(float, live)], device=den.device).view(1, -1, 1, 1, 1)  # x_T always live
    flat = torch.cat([z0.x_start.unsqueeze(1), z0.noise], 1).to(den.device, torch.float32) * mask  # (B, 1+K, …)
    langevin = NoiseSource(seeds, den.device, LANGEVIN_STREAM)

    def as_latent(t: torch.Tensor, timesteps: list[int]) -> Latent:
        return Latent(t[:, 0], t[:, 1:], timesteps, z0.method, z0.eta, seeds, z0.source, z0.condition)

    def energy_at(t: torch.Tensor, k: int, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = generate(den, as_latent(t, timesteps), condition, guidance_scale, checkpoint)
        return energy_fn(x0, augment_keys(seeds, k)), x0

    energies, priors = [], []
    for k in range(steps):
        with torch.enable_grad():
            var = flat.detach().requires_grad_(True)
            prior = prior_energy(as_latent(var, chain))
            e = energy_at(var, k, chain)[0] if weight > 0 else torch.full_like(prior, float("nan"))
            u = prior + weight * e if weight > 0 else prior  # U(z) = ½‖z‖² + λE(G(z)|c)
            (grad,) = torch.autograd.grad(u.sum(), var)
        energies.append(e.detach())
        priors.append(prior.detach())
        n = langevin.draw(k, flat.shape[1:])
        flat = langevin_step(flat.detach(), grad, step_size, n) * mask  # σ = 0 slots stay 0
    with torch.no_grad():
        z = as_latent(flat.detach(), list(z0.timesteps))
        e_end, x0 = energy_at(flat, steps, z.timesteps)  # the output: G on the long grid (eval mode)
    energies.append(e_end)
    priors.append(prior_energy(z))
    return GuideResult(z=z, x0=x0, energy=torch.stack(energies), prior=torch.stack(priors))
