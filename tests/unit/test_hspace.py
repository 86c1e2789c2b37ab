"""h-space editing (Asyrp) against its formulas: the asymmetric step by hand, Δh = 0 is DDIM, skips untouched."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion import Latent, ddim_decode_model_space, load_denoiser
from pipeline.diffusion.hspace import (
    DeltaBlock,
    EditSchedule,
    MidBlockHook,
    TableDirection,
    asymmetric_step,
    edit_walk,
    eps_with_edit,
    first_timestep_reaching,
    h_channels,
    temb_channels,
    trace_h,
)
from pipeline.diffusion.hspace_train import TrainSettings, train_delta_block
from pipeline.diffusion.noise import NoiseSource

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def den(models_dir):
    from tiny_models import _scheduler, save_pixel_model

    sched = _scheduler("ddim", clip_sample=False, set_alpha_to_one=True)
    return load_denoiser(str(save_pixel_model(models_dir / "hspace-unclipped", seed=5, scheduler=sched)))


def _x(b=3, seed=0, size=16):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _h_shape(den, x):
    with MidBlockHook(den.unet) as hook:
        hook.record = True
        den.eps(x[:1], 500)
    return tuple(hook.recorded[0].shape[1:])


def _random_direction(den, x, grid, seed=1, size=1.0):
    shape = _h_shape(den, x)
    g = torch.Generator().manual_seed(seed)
    return TableDirection(list(grid), size * torch.randn(len(grid), *shape, generator=g))


def test_h_is_the_mid_block_output_and_its_sizes_come_from_the_unet(den):
    x = _x(2)
    seen = {}
    handle = den.unet.mid_block.register_forward_hook(lambda m, a, out: seen.setdefault("h", out.detach().clone()))
    try:
        den.eps(x, 700)
    finally:
        handle.remove()
    trace = trace_h(den, x, [700])
    assert torch.equal(trace.h[:, 0], seen["h"].float())
    assert trace.h.shape[2] == h_channels(den.unet)
    assert temb_channels(den.unet) == den.unet.time_embedding.linear_2.out_features


def test_asymmetric_step_matches_the_hand_computed_formula(den):
    """x_p = √ᾱ_p (x_t − √(1−ᾱ_t) ε̃)/√ᾱ_t + √(1−ᾱ_p) ε, with ε̃ from a U-Net whose mid output is h + s·Δh."""
    x, t, t_prev = _x(2), 600, 500
    grid = [t, t_prev]
    direction = _random_direction(den, x, grid, size=0.5)
    scales = torch.tensor([1.5, -0.7])
    # by hand: the network called directly, its mid block edited by a hook written here
    unet = den.unet
    ts = torch.full((2,), t)
    eps = unet(x, ts).sample
    handle = unet.mid_block.register_forward_hook(lambda m, a, h: h + scales.view(-1, 1, 1, 1) * direction.deltas[0])
    try:
        eps_tilde = unet(x, ts).sample
    finally:
        handle.remove()
    from diffusers import DDIMScheduler

    ac = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod
    a_t, a_p = float(ac[t]), float(ac[t_prev])
    expected = math.sqrt(a_p) * (x - math.sqrt(1 - a_t) * eps_tilde) / math.sqrt(a_t) + math.sqrt(1 - a_p) * eps

    e, e_edit = eps_with_edit(den, x, t, direction, scales)
    torch.testing.assert_close(e, eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_edit, eps_tilde, atol=1e-5, rtol=1e-5)
    step = den.schedule.steps_along(grid)[0]
    torch.testing.assert_close(asymmetric_step(den, x, step, e, e_edit), expected, atol=1e-5, rtol=1e-5)
    assert (e_edit - e).abs().max() > 1e-3  # the edit reached ε


def test_the_edit_leaves_skip_connections_untouched(den):
    x = _x(2)
    direction = _random_direction(den, x, [400])
    skips = []
    handles = [b.register_forward_pre_hook(lambda m, a: skips.append([s.detach().clone() for s in a[1]]))
               for b in den.unet.up_blocks]
    try:
        den.eps(x, 400)
        plain = skips[:]
        skips.clear()
        eps_with_edit(den, x, 400, direction, torch.ones(2))
        doubled = skips[:]
    finally:
        for h in handles:
            h.remove()
    for mine, theirs in zip(plain, doubled, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(b[2:], a, atol=1e-6, rtol=1e-6)  # the edited half saw the same skips
            torch.testing.assert_close(b[:2], a, atol=1e-6, rtol=1e-6)


def test_zero_delta_is_exactly_ddim(den):
    x = _x(3)
    grid = den.schedule.grid(10)
    zero = TableDirection(grid, torch.zeros(len(grid), *_h_shape(den, x)))
    ddim = ddim_decode_model_space(den, Latent(x, x.new_zeros(3, 0, 3, 16, 16), grid, method="ddim"))
    edited = edit_walk(den, x, grid, zero, [1.0, 3.0], EditSchedule(t_edit=0, t_boost=0))
    torch.testing.assert_close(edited[:3], ddim, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(edited[3:], ddim, atol=1e-4, rtol=1e-4)


def test_boosting_below_t_boost_is_ddim_with_eta_one_on_the_boost_stream(den):
    from pipeline.diffusion.sampling import step_mean
    from pipeline.diffusion.schedule import ddim_sigma

    x, seeds = _x(2), [11, 12]
    grid = den.schedule.grid(8)
    t_boost = grid[4]
    zero = TableDirection(grid, torch.zeros(len(grid), *_h_shape(den, x)))
    out = edit_walk(den, x, grid, zero, [1.0], EditSchedule(t_edit=1000, t_boost=t_boost), seeds=seeds)
    noise, y = NoiseSource(seeds, "cpu", "boost"), x.clone()
    for i, step in enumerate(den.schedule.steps_along(grid)):
        sigma = ddim_sigma(1.0 if step.t < t_boost else 0.0, step.alpha_t, step.alpha_prev)
        y = step_mean(den, y, step, sigma) + sigma * noise.draw(i, (3, 16, 16))
    torch.testing.assert_close(out, y, atol=1e-4, rtol=1e-4)
    plain = ddim_decode_model_space(den, Latent(x, x.new_zeros(2, 0, 3, 16, 16), grid, method="ddim"))
    assert (out - plain).abs().max() > 1e-3  # the boost added noise


def test_edit_applies_only_at_and_above_t_edit_and_scales_are_scale_major(den):
    x = _x(2)
    grid = den.schedule.grid(10)
    direction = _random_direction(den, x, grid, size=2.0)
    none_edited = edit_walk(den, x, grid, direction, [1.0], EditSchedule(t_edit=1000, t_boost=0))
    ddim = ddim_decode_model_space(den, Latent(x, x.new_zeros(2, 0, 3, 16, 16), grid, method="ddim"))
    torch.testing.assert_close(none_edited, ddim, atol=1e-4, rtol=1e-4)

    out = edit_walk(den, x, grid, direction, [0.0, 0.5, 1.0], EditSchedule(t_edit=grid[5], t_boost=0))
    torch.testing.assert_close(out[:2], ddim, atol=1e-4, rtol=1e-4)  # scale 0 first
    moved = [(out[2 * j : 2 * j + 2] - ddim).abs().mean().item() for j in range(3)]
    assert moved[0] < 1e-5 < moved[1] < moved[2], moved
    doubled = edit_walk(den, x, grid, direction, [0.5], EditSchedule(t_edit=grid[5], t_boost=0, grid_scale=2.0))
    torch.testing.assert_close(doubled, out[4:], atol=1e-4, rtol=1e-4)  # grid_scale multiplies Δh


def test_edit_with_guidance_edits_both_branches_of_the_edited_rows(class_model):
    den = load_denoiser(str(class_model), null_class=0)
    x = _x(2)
    direction = _random_direction(den, x, [500])
    w, cond = 3.0, [1, 2]
    e, e_edit = eps_with_edit(den, x, 500, direction, torch.tensor([1.0, 0.0]), cond, w)
    torch.testing.assert_close(e, den.eps(x, 500, cond, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_edit[1], e[1], atol=1e-5, rtol=1e-5)  # scale 0 row: no edit
    by_hand = []
    for labels in ([0, 0], cond):  # ε_u + w(ε_c − ε_u), both branches edited
        handle = den.unet.mid_block.register_forward_hook(
            lambda m, a, h: h + torch.tensor([1.0, 0.0]).view(-1, 1, 1, 1) * direction.deltas[0])
        try:
            by_hand.append(den.unet(x, torch.full((2,), 500), class_labels=torch.tensor(labels)).sample)
        finally:
            handle.remove()
    torch.testing.assert_close(e_edit, by_hand[0] + w * (by_hand[1] - by_hand[0]), atol=1e-5, rtol=1e-5)


def test_delta_block_is_the_official_layer_stack(den):
    block = DeltaBlock.for_unet(den.unet)
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    c, d = h_channels(den.unet), temb_channels(den.unet)
    h, temb = torch.randn(2, c, 2, 2), torch.randn(2, d)
    x = torch.nn.functional.conv2d(h, block.conv1.weight, block.conv1.bias)
    x = x + (torch.nn.functional.silu(temb) @ block.temb_proj.weight.T + block.temb_proj.bias)[:, :, None, None]
    x = torch.nn.functional.group_norm(x, block.norm2.num_groups, block.norm2.weight, block.norm2.bias, 1e-6)
    expected = torch.nn.functional.conv2d(torch.nn.functional.silu(x), block.conv2.weight, block.conv2.bias)
    torch.testing.assert_close(block(h, temb, 500), expected)


def test_first_timestep_reaching_scans_upward():
    ts, values = [900, 600, 300, 0], [0.9, 0.5, 0.2, 0.0]
    assert first_timestep_reaching(ts, values, 0.33) == 600
    assert first_timestep_reaching(ts, values, 0.2) == 300
    assert first_timestep_reaching(ts, values, 5.0) is None  # never reached: the caller names the setting


def test_table_direction_uses_the_nearest_fitted_timestep():
    d = TableDirection([900, 500, 100], torch.arange(3.0).view(3, 1, 1, 1))
    h = torch.zeros(2, 1, 1, 1)
    assert [d(h, None, t)[0].item() for t in (999, 700, 701, 301, 300, 0)] == [0.0, 1.0, 0.0, 1.0, 2.0, 2.0]  # a tie: the lower


def test_training_a_delta_block_lowers_the_loss_and_moves_the_attribute(den):
    """An offline differentiable attribute: the mean colour of x̂0 pushed toward red."""
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)

    def redness(x):  # mean over pixels of R − (G + B)/2
        return (x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])).mean()

    def attribute_loss(x0_edit, x0):
        return (x0_edit.mean((2, 3), keepdim=True) - red).pow(2).mean()

    x0 = _x(4, seed=2).clamp(-1, 1) * 0.5
    grid = den.schedule.grid(10)
    from pipeline.diffusion import ddim_invert_model_space

    x_start = ddim_invert_model_space(den, x0, timesteps=grid).x_start
    t_edit = grid[5]
    block = DeltaBlock.for_unet(den.unet)
    schedule = EditSchedule(t_edit=t_edit, t_boost=0)
    before = edit_walk(den, x_start, grid, block, [1.0], schedule)
    log = train_delta_block(den, block, x_start, x0, grid, t_edit, attribute_loss,
                            TrainSettings(lr=0.05, iterations=4, batch_size=2, l1_weight=0.1))
    assert len(log.loss) == 4
    assert log.attribute[-1] < 0.7 * log.attribute[0], log.attribute
    after = edit_walk(den, x_start, grid, block, [1.0], schedule)
    unedited = edit_walk(den, x_start, grid, block, [0.0], schedule)
    assert redness(after) > redness(unedited) + 0.1 and redness(after) > redness(before) + 0.1
    assert not any(p.requires_grad for p in block.parameters())
