"""Training an h-space direction f_t (a ``DeltaBlock``) as the official Asyrp code does
(kwonminki/Asyrp_official diffusion_latent.py:229-355, run_training).

For each batch of inverted latents, walk the grid from t0 down to t_edit twice: the edited walk
(asymmetric step, ``hspace.asymmetric_step``) and the original DDIM walk. At every timestep take one
optimiser step on

    loss = w_attr · L_attr(x̂0_edit, x0) + w_l1 · c · L1(x̂0_edit, x̂0_orig)

(diffusion_latent.py:340-351; L_attr is −log((2 − directional CLIP loss)/2) officially, and c is the
cosine of the source and target texts; any differentiable L_attr plugs in). The edited state is
detached between steps (diffusion_latent.py:308 ``xt_next.detach()``). SGD, StepLR stepped once per
iteration over the images (diffusion_latent.py:201-202, :406).

Everything trains in float32, as the official code (no autocast or half anywhere in run_training):
the gradient reaching f_t comes back through the U-Net's decoder, where float16 underflows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.diffusion.ddim_step import generative_mean, predict_x0
from pipeline.diffusion.hspace import DeltaBlock, eps_with_edit

# L_attr(x̂0 of the edited walk, x0 of the input), both in the model's space; a scalar to minimise
AttributeLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Defaults: the official training script (script_train.sh) and argument defaults (main.py)."""

    lr: float = 0.5  # script_train.sh --lr_training 0.5
    lr_step: int = 3  # main.py:218 --scheduler_step_size 3
    lr_gamma: float = 0.1  # main.py:219 --sch_gamma 0.1
    iterations: int = 5  # script_train.sh --n_iter 5
    batch_size: int = 1  # script_train.sh --bs_train 1
    attribute_weight: float = 1.0  # script_train.sh --clip_loss_w 1.0
    l1_weight: float = 3.0  # script_train.sh --l1_loss_w 3.0
    l1_factor: float = 1.0  # c above: cos(source text, target text) with CLIP (diffusion_latent.py:350), else 1


@dataclass
class TrainLog:
    """Mean losses per iteration (over its optimiser steps)."""

    loss: list[float]
    attribute: list[float]
    l1: list[float]


def train_delta_block(
    den,
    block: DeltaBlock,
    x_start: torch.Tensor,
    x0: torch.Tensor,
    timesteps: list[int],
    t_edit: int,
    attribute_loss: AttributeLoss,
    settings: TrainSettings = TrainSettings(),
    *,
    condition=None,
    guidance_scale: float = 1.0,
) -> TrainLog:
    """Train ``block`` in place on inverted latents ``x_start`` (N, …) at ``timesteps[0]`` of the
    images ``x0`` (N, …, model space). Only the steps with t ≥ t_edit train (the rest never sees Δh)."""
    # official seq_train: the grid's t ≥ t_edit (diffusion_latent.py:154-156); the official last step goes to
    # t_next = −1 instead of the next grid t, but its x_next is never used, only its x0_t
    steps = [s for s in den.schedule.steps_along(timesteps) if s.t >= t_edit]
    if not steps:
        raise ValueError(f"t_edit = {t_edit} is above every timestep of the grid {timesteps[:3]}…: nothing to train")
    if den.dtype != torch.float32:
        raise ValueError(f"train a DeltaBlock through a float32 model (this one is {den.dtype}): float16 gradients "
                         "underflow on their way back through the U-Net's decoder")
    block.to(den.device, torch.float32).train().requires_grad_(True)
    optim = torch.optim.SGD(block.parameters(), lr=settings.lr, weight_decay=0)
    lr_steps = torch.optim.lr_scheduler.StepLR(optim, step_size=settings.lr_step, gamma=settings.lr_gamma)
    log = TrainLog([], [], [])
    n = x_start.shape[0]
    for _ in range(settings.iterations):
        sums, count = [0.0, 0.0, 0.0], 0
        for lo in range(0, n, settings.batch_size):
            x_edit = x_orig = x_start[lo : lo + settings.batch_size].to(den.device, torch.float32)
            target = x0[lo : lo + settings.batch_size].to(den.device, torch.float32)
            ones = torch.ones(x_edit.shape[0], device=den.device)
            for step in steps:
                optim.zero_grad()
                with torch.no_grad():  # the original DDIM walk
                    eps_orig = den.eps(x_orig, step.t, condition, guidance_scale)
                    x0_orig = predict_x0(x_orig, eps_orig, step.alpha_t)
                with torch.enable_grad():
                    eps, eps_edit = eps_with_edit(den, x_edit, step.t, block, ones, condition, guidance_scale)
                    x0_edit = predict_x0(x_edit, eps_edit, step.alpha_t)  # unclipped, as utils/diffusion_utils.py:86
                    attr = attribute_loss(x0_edit, target)
                    l1 = torch.nn.functional.l1_loss(x0_edit, x0_orig)
                    loss = settings.attribute_weight * attr + settings.l1_weight * settings.l1_factor * l1
                loss.backward()
                optim.step()
                x_edit = generative_mean(x0_edit.detach(), eps.detach(), step.alpha_prev, 0.0)
                x_orig = generative_mean(x0_orig, eps_orig, step.alpha_prev, 0.0)
                sums = [sums[0] + loss.item(), sums[1] + attr.item(), sums[2] + l1.item()]
                count += 1
        lr_steps.step()
        log.loss.append(sums[0] / count)
        log.attribute.append(sums[1] / count)
        log.l1.append(sums[2] / count)
    block.eval().requires_grad_(False)
    return log
