"""Guidance in latent space (CycleDiffusion): the Langevin step, the differentiable decoder G, energies
and DiffAugment, on a tiny random pixel model and a tiny random CLIP (no downloads)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import GuideConfig
from pipeline.diffusion import load_denoiser
from pipeline.diffusion.dpm import dpm_decode_model_space
from pipeline.diffusion.guidance import (
    INIT_STREAM,
    LANGEVIN_STREAM,
    generate,
    guide,
    initial_latent,
    langevin_step,
    prior_energy,
)
from pipeline.diffusion.latent import Latent
from pipeline.diffusion.noise import NoiseSource
from pipeline.diffusion.sampling import denoise
from pipeline.metrics.augment import (
    augment,
    color,
    cutout,
    diff_augment,
    draw_params,
    param_count,
    translation,
)
from pipeline.metrics.clip import load_clip
from pipeline.metrics.energy import clip_energy, color_energy, hue_energy, make_energy
from pipeline.tools.random_clip import save_random_clip

pytestmark = pytest.mark.unit

SHAPE = (3, 16, 16)
STEPS, ETA = 4, 1.0


@pytest.fixture(scope="module")
def den(pixel_model):
    return load_denoiser(str(pixel_model), device="cpu")


def red(x, keys=None):
    return color_energy([1.0, 0.0, 0.0])(x.clamp(-1, 1), keys)


# ---- (1) the Langevin step --------------------------------------------------------------------


def test_one_langevin_step_is_the_formula_by_hand(den):
    """z¹ = z⁰ − s/2·(z⁰ + λ∇E(G(z⁰))) + √s·n, n map 0 of the "langevin" stream; G by hand is
    sampling.denoise (another code path than guidance.generate)."""
    seeds, s, lam = [3, 7], 0.05, 5.0
    z0 = initial_latent(den, SHAPE, steps=STEPS, eta=ETA, seeds=seeds)
    # z⁰ is N(0, I) from the sample's own init stream: x_T is map 0, ε of step i map i + 1
    init = NoiseSource(seeds, "cpu", INIT_STREAM)
    assert torch.equal(z0.x_start, init.draw(0, SHAPE)) and torch.equal(z0.noise[:, 1], init.draw(2, SHAPE))
    # this scheduler ends at ᾱ = 1: the last step has σ = 0, its slot drives nothing and is held at 0
    assert torch.count_nonzero(z0.noise[:, -1]) == 0 and torch.count_nonzero(z0.noise[:, :-1]) > 0

    out = guide(den, z0, red, steps=1, step_size=s, weight=lam, seeds=seeds, checkpoint=False)

    x_T = z0.x_start.clone().requires_grad_(True)
    eps = z0.noise.clone().requires_grad_(True)
    e = red(denoise(den, x_T, z0.timesteps, eta=ETA, noise=eps))
    g_x, g_eps = torch.autograd.grad(e.sum(), (x_T, eps))
    n = NoiseSource(seeds, "cpu", LANGEVIN_STREAM).draw(0, (1 + STEPS, *SHAPE))
    want_x = z0.x_start - s / 2 * (z0.x_start + lam * g_x) + math.sqrt(s) * n[:, 0]
    want_eps = z0.noise - s / 2 * (z0.noise + lam * g_eps) + math.sqrt(s) * n[:, 1:]
    assert torch.allclose(out.z.x_start, want_x, atol=1e-5)
    assert torch.allclose(out.z.noise[:, :-1], want_eps[:, :-1], atol=1e-5)
    assert torch.count_nonzero(out.z.noise[:, -1]) == 0  # the σ = 0 slot is not a variable
    assert g_x.abs().sum() > 0  # the energy really pulled on z (the test would pass for λ = 0 otherwise)
    assert torch.allclose(out.energy[0], e.detach(), atol=1e-6)
    assert torch.allclose(out.prior[0], 0.5 * (z0.x_start.pow(2).sum((1, 2, 3)) + z0.noise.pow(2).sum((1, 2, 3, 4))))


def test_langevin_step_and_prior_energy_are_the_plain_formulas():
    z, g, n = torch.full((2, 3), 2.0), torch.full((2, 3), 4.0), torch.full((2, 3), -1.0)
    assert torch.allclose(langevin_step(z, g, 0.04, n), torch.full((2, 3), 2.0 - 0.02 * 4.0 - 0.2))
    lat = Latent(torch.ones(2, 1, 2, 2), torch.full((2, 3, 1, 2, 2), 2.0), [3, 2, 1])
    assert prior_energy(lat).tolist() == [0.5 * (4 + 12 * 4)] * 2


def test_a_chain_depends_on_its_seed_alone_not_on_its_batch(den):
    z_pair = initial_latent(den, SHAPE, steps=STEPS, eta=ETA, seeds=[11, 12])
    z_one = initial_latent(den, SHAPE, steps=STEPS, eta=ETA, seeds=[12])
    pair = guide(den, z_pair, red, steps=2, step_size=0.05, weight=20.0, seeds=[11, 12])
    one = guide(den, z_one, red, steps=2, step_size=0.05, weight=20.0, seeds=[12])
    assert torch.allclose(pair.z.x_start[1:], one.z.x_start, atol=1e-5)
    assert torch.allclose(pair.x0[1:], one.x0, atol=1e-5)
    assert not torch.allclose(pair.z.x_start[0], pair.z.x_start[1])


# ---- (2) G against the project's decoder, and checkpointing --------------------------------------


def test_generate_is_the_dpm_decoder_and_checkpointing_keeps_the_gradient(den):
    z = initial_latent(den, SHAPE, steps=STEPS, eta=ETA, seeds=[1, 2, 3])
    x = generate(den, z)
    assert torch.allclose(x, dpm_decode_model_space(den, z, reconstruct=False), atol=1e-6)
    # read as a reconstruction (same model, condition), the zero σ = 0 slot replays nothing: same image
    assert torch.allclose(x, dpm_decode_model_space(den, z), atol=1e-6)

    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def grads(checkpoint):
        a, b = z.x_start.clone().requires_grad_(True), z.noise.clone().requires_grad_(True)
        y = generate(den, Latent(a, b, z.timesteps, "dpm", z.eta), checkpoint=checkpoint)
        return torch.autograd.grad((y * w).sum(), (a, b))

    plain, ckpt = grads(False), grads(True)
    assert plain[0].abs().sum() > 0 and plain[1][:, 0].abs().sum() > 0
    assert torch.allclose(plain[0], ckpt[0], atol=1e-6) and torch.allclose(plain[1], ckpt[1], atol=1e-6)


# ---- (3) guidance does what it is for -------------------------------------------------------------


def test_guidance_lowers_the_energy_against_the_unguided_chain(den):
    """Same seeds, same Langevin noise: λ = 200 pulls the mean colour toward red; λ = 0 (the prior
    alone) does not. 20 steps of s = 0.05."""
    seeds = [21, 22, 23, 24]
    z0 = initial_latent(den, SHAPE, steps=STEPS, eta=ETA, seeds=seeds)
    guided = guide(den, z0, red, steps=20, step_size=0.05, weight=200.0, seeds=seeds)
    free = guide(den, z0, red, steps=20, step_size=0.05, weight=0.0, seeds=seeds)
    start = guided.energy[0].mean()
    assert guided.energy[-1].mean() < start - 0.05
    assert guided.energy[-1].mean() < free.energy[-1].mean() - 0.05
    assert torch.allclose(guided.x0, generate(den, guided.z), atol=1e-6)  # x0 is G of the returned z
    # the prior keeps z Gaussian-sized: ½‖z‖² stays near d/2 (d = 4 live maps of 768 + x_T)
    d = 768 * (1 + STEPS - 1)
    assert torch.all((guided.prior[-1] - d / 2).abs() < 0.1 * d)


def test_hue_and_colour_energies_measure_what_they_say():
    def flat(rgb):  # an image of one colour, rgb in [0, 1]
        return (torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, 4, 4) * 2 - 1).clone()

    red_img, green_img, grey_img = flat([1.0, 0, 0]), flat([0, 1.0, 0]), flat([0.5, 0.5, 0.5])
    assert float(hue_energy(0)(red_img)) == pytest.approx(0, abs=1e-6)
    assert float(hue_energy(180)(red_img)) == pytest.approx(2, abs=1e-6)
    assert float(hue_energy(120)(green_img)) == pytest.approx(0, abs=1e-6)
    assert float(hue_energy(0)(green_img)) == pytest.approx(1.5, abs=1e-6)  # 120° away: 1 − cos 120°
    assert float(hue_energy(77)(grey_img)) == pytest.approx(1, abs=1e-3)  # no hue: neutral
    assert float(color_energy([1, 0, 0])(grey_img)) == pytest.approx(0.75)
    x = flat([0.6, 0.4, 0.3]).requires_grad_(True)
    hue_energy(200)(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_make_energy_follows_the_config_and_loads_clip_only_for_clip():
    def no_clip():
        raise AssertionError("an offline energy loaded CLIP")

    hue = make_energy(GuideConfig(energy="hue", target_hue=120), no_clip)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert float(hue(green)) == pytest.approx(0, abs=1e-6)
    color = make_energy(GuideConfig(energy="color", target_color=[0, 1, 0]), no_clip)
    assert float(color(green)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="guide.text"):
        make_energy(GuideConfig(energy="clip"), no_clip)


# ---- (4) DiffAugment -------------------------------------------------------------------------------


def _images(n=3, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_diffaugment_shapes_gradients_and_keys():
    x = _images().requires_grad_(True)
    policy = ["color", "translation", "cutout"]
    out = augment(x, policy, keys=[5, 6, 7], count=4)
    assert out.shape == (12, 3, 16, 16)
    out.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # image b's views come from keys[b] alone: the same with or without the other images
    again = augment(x.detach()[1:], policy, keys=[6, 7], count=4)
    assert torch.equal(again, out.detach()[4:])
    assert not torch.equal(out[0], out[1])  # each view draws its own parameters
    u = draw_params([5, 5, 9], 2, policy)
    assert u.shape == (3, 2, param_count(policy)) and torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_each_diffaugment_op_changes_the_image_and_an_empty_policy_is_identity():
    x = _images(2)
    assert diff_augment(x, [], torch.zeros(2, 0)) is x
    # colour: u = (¾, ½, ½) is brightness + ¼, saturation × 1, contrast × 1 (DiffAugment_pytorch.py:21-35)
    assert torch.allclose(color(x, torch.tensor([[0.75, 0.5, 0.5]] * 2)), x + 0.25, atol=1e-6)
    assert not torch.allclose(color(x, torch.tensor([[0.5, 0.9, 0.5]] * 2)), x)  # saturation alone
    assert not torch.allclose(color(x, torch.tensor([[0.5, 0.5, 0.9]] * 2)), x)  # contrast alone
    # translation: u = 0.99 is the largest shift, +16 // 8 = 2 rows and columns; vacated pixels are 0
    moved = translation(x, torch.tensor([[0.99, 0.5]] * 2))  # rows +2, columns 0
    assert torch.equal(moved[:, :, :-2], x[:, :, 2:]) and torch.count_nonzero(moved[:, :, -2:]) == 0
    # cutout: an 8 × 8 box centred in the image is zeroed, nothing else changes
    cut = cutout(x, torch.tensor([[0.5, 0.5]] * 2))
    zeroed = (cut == 0) & (x != 0)
    assert zeroed[:, 0].sum(dim=(1, 2)).tolist() == [64, 64] and torch.equal(cut[~zeroed], x[~zeroed])
    with pytest.raises(ValueError, match="unknown DiffAugment op"):
        param_count(["rotate"])


# ---- (5) the CLIP energy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    config, weights = save_random_clip(tmp_path_factory.mktemp("clip"))
    return load_clip(config, weights, device="cpu")


def test_clip_energy_is_one_minus_cosine_and_averages_its_augmentations(tiny_clip):
    x = _images(2, size=32)
    text = "a red disc"
    direct = 1 - F.cosine_similarity(tiny_clip.image_features(x), tiny_clip.text_features([text]).expand(2, -1))
    plain = clip_energy(tiny_clip, text)
    assert torch.allclose(plain(x), direct, atol=1e-6)

    policy = ["color", "translation", "cutout"]
    e = clip_energy(tiny_clip, text, policy, count=3)
    views = augment(x, policy, [1, 2], 3)
    by_hand = (1 - F.cosine_similarity(tiny_clip.image_features(views),
                                       tiny_clip.text_features([text]).expand(6, -1))).view(2, 3).mean(1)
    xg = x.clone().requires_grad_(True)
    value = e(xg, keys=[1, 2])
    assert torch.allclose(value, by_hand, atol=1e-6) and not torch.allclose(value, direct, atol=1e-4)
    value.sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="augmentation key"):
        e(x)


def test_guide_stage_batches_in_flight_and_in_pieces_give_each_chain_alone(pixel_model):
    """The stage's rows: two batches in flight (threads) and a batch split because its backward pass
    does not fit (a UNet that fails above 2 rows) give the images the whole batch gives at once."""
    from concurrent.futures import ThreadPoolExecutor

    from small_gpu import out_of_memory_above

    from pipeline.config import ClipConfig, ModelConfig, OutputConfig, SamplerConfig
    from pipeline.data.rows import RowBuffer, RowKind
    from pipeline.stages.guide import GuideStage

    def stage():
        return GuideStage(ModelConfig(model=str(pixel_model)),
                          GuideConfig(energy="hue", target_hue=120, weight=10, langevin_steps=3),
                          ClipConfig(), SamplerConfig(steps=STEPS, eta=ETA, seed=5), OutputConfig(latents="none"),
                          size=16)

    def batch(numbers):
        rows = RowBuffer()
        for n in numbers:
            rows.add(shard="guided-00000", key=f"{n:06d}", index=n, kind=RowKind.SAMPLE, candidate=n)
        return rows.batch()

    assert GuideStage.concurrent_batches == 2
    whole = stage()(batch(range(5)))
    small = stage()
    out_of_memory_above(small.source, 2)
    pieces = small(batch(range(5)))
    assert small.device_rows == 2
    with ThreadPoolExecutor(2) as pool:
        threads = list(pool.map(small, [batch([0, 1]), batch([2, 3, 4])]))
    for got in (list(pieces["pixels"]), [p for out in threads for p in out["pixels"]]):
        assert len(got) == 5
        for a, b in zip(got, whole["pixels"], strict=True):
            assert abs(a.astype(int) - b.astype(int)).max() <= 1
    assert list(pieces["seed"]) == list(whole["seed"]) and list(pieces["key"]) == list(whole["key"])
