"""Guidance in latent space (CycleDiffusion): the Langevin step, the differentiable decoder G (the
stochastic DPM walk, and the official LDM runs' η = 0 walk of z = x_T with a short chain grid and a long
output grid), energies and DiffAugment, on a tiny random pixel model and a tiny random CLIP (no
downloads). The official code is ChenWu98/unified-generative-zoo, cited as zoo FILE:LINE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import GuideConfig
from pipeline.diffusion import load_denoiser
from pipeline.diffusion.ddim import ddim_decode_model_space
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
from pipeline.metrics.energy import ClipEnergy, clip_energy, color_energy, hue_energy, make_energy
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


# ---- (2b) η = 0: z = x_T, the DDIM walk, a short chain grid and a long output grid (the zoo's LDM runs) ----


def _prior(x):  # zoo model/energy/prior_z.py:14-20: ½ Σ z² per sample
    return 0.5 * x.pow(2).sum((1, 2, 3))


def test_eta_0_guidance_is_langevin_on_x_T_through_the_ddim_walk(den):
    """zoo latentdiff_wrapper.py: DDIM with eta '0' (:24), z = x_T (:212); langevin_dynamics.py:97-100:
    z ← z − (s/2)·∇(½‖z‖² + λE(G(z))) + √s·n (PriorZEnergy weight 1, …_300.cfg:24-25). Written out here
    for two steps, G by sampling.denoise (another code path than guidance.generate)."""
    seeds, s, lam, grid = [3, 7], 0.05, 5.0, den.schedule.grid(STEPS)
    z0 = initial_latent(den, SHAPE, steps=STEPS, eta=0.0, seeds=seeds)
    assert z0.method == "ddim" and z0.noise.shape[1] == 0 and z0.timesteps == grid and z0.eta == 0
    assert torch.equal(z0.x_start, NoiseSource(seeds, "cpu", INIT_STREAM).draw(0, SHAPE))  # x_T: map 0

    out = guide(den, z0, red, steps=2, step_size=s, weight=lam, seeds=seeds, checkpoint=False)

    langevin, z = NoiseSource(seeds, "cpu", LANGEVIN_STREAM), z0.x_start
    for k in range(2):
        x_T = z.clone().requires_grad_(True)
        e = red(denoise(den, x_T, grid, eta=0.0))  # G(z): the deterministic DDIM walk of x_T
        (g_e,) = torch.autograd.grad(e.sum(), x_T)
        assert g_e.abs().sum() > 0  # the energy pulls on z (λ would not matter otherwise)
        n = langevin.draw(k, (1, *SHAPE))[:, 0]
        z = z - s / 2 * (z + lam * g_e) + math.sqrt(s) * n  # ∇½‖z‖² = z
    assert torch.allclose(out.z.x_start, z, atol=1e-5)
    assert out.z.method == "ddim" and out.z.noise.shape[1] == 0 and out.z.timesteps == grid
    # the output is the plain DDIM decode of the final z: a stored z decodes to the image
    assert torch.allclose(out.x0, ddim_decode_model_space(den, out.z), atol=1e-6)
    assert torch.allclose(out.prior[0], _prior(z0.x_start)) and torch.allclose(out.prior[-1], _prior(z), atol=1e-4)


def test_the_chain_walks_chain_steps_and_the_output_is_the_long_grid_decode(den):
    """zoo langevin_dynamics.py:120-123 (train() in the chain, eval() after) and latentdiff_wrapper.py:204-209
    (train: custom_steps_train, eval: custom_steps), …_300.cfg:9-10 (500 and 10). Here 8 and 2: the
    gradient goes through the 2-step walk, the image is the 8-step walk of the final x_T."""
    seeds, s, lam = [4, 5], 0.05, 50.0
    long, short = den.schedule.grid(8), den.schedule.grid(2)
    z0 = initial_latent(den, SHAPE, steps=8, eta=0.0, seeds=seeds)
    out = guide(den, z0, red, steps=1, step_size=s, weight=lam, seeds=seeds, checkpoint=False, chain_timesteps=short)

    x_T = z0.x_start.clone().requires_grad_(True)
    e_short = red(denoise(den, x_T, short, eta=0.0))
    (g,) = torch.autograd.grad((_prior(x_T) + lam * e_short).sum(), x_T)
    want = z0.x_start - s / 2 * g + math.sqrt(s) * NoiseSource(seeds, "cpu", LANGEVIN_STREAM).draw(0, (1, *SHAPE))[:, 0]
    assert torch.allclose(out.z.x_start, want, atol=1e-5) and out.z.timesteps == long
    x_long = denoise(den, want, long, eta=0.0)
    assert torch.allclose(out.x0, x_long, atol=1e-5)
    assert not torch.allclose(out.x0, denoise(den, want, short, eta=0.0), atol=1e-3)  # the grids differ
    # energies: the chain's on the short grid; the last of the output image (langevin_dynamics.py:142-146)
    assert torch.allclose(out.energy[0], e_short.detach(), atol=1e-6)
    assert torch.allclose(out.energy[-1], red(x_long), atol=1e-5)
    # the long grid's gradient moves z elsewhere: this test sees which grid the chain walked
    on_long = guide(den, z0, red, steps=1, step_size=s, weight=lam, seeds=seeds, checkpoint=False)
    assert not torch.allclose(on_long.z.x_start, out.z.x_start, atol=1e-4)
    # a DPM latent holds one ε per step of its grid: another chain grid would need another z
    with pytest.raises(ValueError, match="DDIM latent"):
        guide(den, initial_latent(den, SHAPE, steps=8, eta=1.0, seeds=seeds), red, steps=1, step_size=s,
              weight=lam, seeds=seeds, chain_timesteps=short)


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

    policy = ["color", "translation", "resize", "cutout"]
    e = clip_energy(tiny_clip, text, policy, count=3)
    # the views are DiffAugment of the [0, 1] image (x + 1)/2, the zoo wrapper's post_process
    # (latentdiff_wrapper.py:200-202, clip_guide.py:45-51), handed to CLIP as [0, 1] images
    views = augment((x + 1) / 2, policy, [1, 2], 3)
    by_hand = (1 - F.cosine_similarity(tiny_clip.image_features(views, unit=True),
                                       tiny_clip.text_features([text]).expand(6, -1))).view(2, 3).mean(1)
    xg = x.clone().requires_grad_(True)
    value = e(xg, keys=[1, 2])
    assert torch.allclose(value, by_hand, atol=1e-6) and not torch.allclose(value, direct, atol=1e-4)
    value.sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="augmentation key"):
        e(x)


class RecordingClip:
    """A stand-in CLIP that records the images (and ``unit``) it is given; features = mean colour."""

    def __init__(self):
        self.seen = []

    def text_features(self, texts):
        return torch.tensor([[1.0, 0.0, 0.0]])

    def image_features(self, images, unit=False):
        self.seen.append((images.detach().clone(), unit))
        return images.mean(dim=(2, 3))


def _official_color(x, r):
    """zoo DiffAugment_pytorch.py:23-37 with torch.rand's draws given as the columns of r (N, 3)."""
    x = x + (r[:, 0].view(-1, 1, 1, 1) - 0.5)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (r[:, 1].view(-1, 1, 1, 1) * 2) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (r[:, 2].view(-1, 1, 1, 1) + 0.5) + m


def test_clip_energy_augments_the_0_1_image_brightness_half_its_range_fill_black():
    """zoo clip_guide.py:45-51 augments the wrapper's output, post-processed to [0, 1] (latentdiff_wrapper.py:
    200-202): brightness ± ½ of [0, 1], translation and cutout fill 0 = black; CLIP is told the views are
    [0, 1] images (``unit``)."""
    x = _images(1, size=16, seed=3)
    clip = RecordingClip()
    clip_energy(clip, "t", ["color"], count=4)(x, keys=[7])
    (views, unit), = clip.seen
    r = draw_params([7], 4, ["color"])[0]
    assert unit is True
    assert torch.allclose(views, _official_color(((x + 1) / 2).expand(4, -1, -1, -1), r), atol=1e-6)
    # not the old [-1, 1] augmentation mapped to [0, 1] afterwards (brightness half as strong there)
    assert not torch.allclose(views, (_official_color(x.expand(4, -1, -1, -1), r) + 1) / 2, atol=1e-3)

    white = torch.ones(1, 3, 16, 16)  # 1 in [-1, 1]: 1 in [0, 1]
    clip.seen.clear()
    clip_energy(clip, "t", ["translation", "cutout"], count=8)(white, keys=[11])
    views = clip.seen[0][0]
    assert set(views.unique().tolist()) == {0.0, 1.0}  # kept pixels white, filled pixels black (not 0.5 grey)


def test_the_clip_energy_defaults_are_the_official_ones():
    """λ 300 (…_langevin_300.cfg:19; the siblings _100/_700/_1000 only change it), 50 replicas
    (clip_guide.py:18), policy 'color,translation,resize,cutout' (clip_guide.py:10), energy on the
    unclamped image (latentdiff_wrapper.py:200-202 has no clamp). hue/color keep the demo's λ 100 and
    clamp; an explicit value always wins."""
    g = GuideConfig(energy="clip", text="a photo of a baby")
    assert (g.weight, g.augmentations, g.augment, g.clamp) == (300.0, 50, ["color", "translation", "resize", "cutout"],
                                                             False)
    hue = GuideConfig(energy="hue", target_hue=120)
    assert (hue.weight, hue.clamp) == (100.0, True)
    assert GuideConfig(energy="clip", weight=0, clamp=True).weight == 0 and GuideConfig(clamp=True).clamp is True
    clip = RecordingClip()
    e = make_energy(g, lambda: clip)
    assert isinstance(e, ClipEnergy) and e.count == 50 and e.policy == ("color", "translation", "resize", "cutout")
    x = _images(2, size=16)
    value = e(x, keys=[1, 2])
    views = clip.seen[0][0]
    assert views.shape == (100, 3, 16, 16) and value.shape == (2,)  # B · 50 views, one energy per image
    assert torch.equal(views[50:], augment((x[1:] + 1) / 2, g.augment, [2], 50))  # image 1's 50, its key alone


def test_the_guide_stage_clamps_the_energy_input_as_guide_clamp_says(pixel_model):
    """guide.clamp false (clip's default, as the zoo): the energy sees G(z) as decoded, beyond [-1, 1]
    where it is; true (hue/color): clamped. The η = 0 path with a chain grid runs in the stage."""
    from pipeline.config import ClipConfig, ModelConfig, OutputConfig, SamplerConfig
    from pipeline.data.rows import RowBuffer, RowKind
    from pipeline.stages.guide import GuideStage

    def largest(clamp):
        stage = GuideStage(ModelConfig(model=str(pixel_model)),
                           GuideConfig(energy="hue", target_hue=120, langevin_steps=1, chain_steps=2, clamp=clamp),
                           ClipConfig(), SamplerConfig(method="ddim", eta=0.0, steps=STEPS, seed=5, clip_x0="off"),
                           OutputConfig(latents="none"), size=16)
        seen, energy = [], stage.energy
        stage.energy = lambda x, keys=None: (seen.append(float(x.detach().abs().max())), energy(x, keys))[1]
        rows = RowBuffer()
        for n in range(2):
            rows.add(shard="guided-00000", key=f"{n:06d}", index=n, kind=RowKind.SAMPLE, candidate=n)
        out = stage(rows.batch())
        assert len(out["pixels"]) == 2
        return max(seen)

    assert largest(False) > 1.0 >= largest(True)


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


# ---- (6) the paper config -------------------------------------------------------------------------


def test_the_paper_config_is_the_official_ldm_run_and_its_scheduler_walks_ldms_grids(monkeypatch):
    """configs/paper/guide-clip-baby-ffhq256.yaml against zoo clip_a_baby_ffhq256_latentdiff_10step_langevin_300.cfg
    (:3-4 s 0.05, 200 steps; :9-10 custom_steps 500, custom_steps_train 10; :19-21 λ 300, the text,
    ViT-B/32) and latentdiff_wrapper.py:24 (η 0). The converted scheduler its comment names (DDIM,
    scaled_linear 0.0015-0.0195, steps_offset 1, set_alpha_to_one false) walks LDM's grids
    (make_ddim_timesteps 'uniform', ldm/modules/diffusionmodules/util.py:46-61), on LDM's betas (:21-25),
    ending at ᾱ_0 (alphas_prev, :67)."""
    from pathlib import Path

    from diffusers import DDIMScheduler

    from pipeline.config import load_config
    from pipeline.diffusion.schedule import schedule_from_scheduler

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "paper" / "guide-clip-baby-ffhq256.yaml")
    g, s = cfg.guide, cfg.sampler
    assert (g.step_size, g.langevin_steps, g.weight, g.text) == (0.05, 200, 300, "a photo of a baby")
    assert (s.method, s.eta, s.steps, g.chain_steps, s.clip_x0) == ("ddim", 0.0, 500, 10, "off")
    assert (g.augmentations, g.augment, g.clamp) == (50, ["color", "translation", "resize", "cutout"], False)
    assert cfg.clip.model == "ViT-B-32-quickgelu" and cfg.clip.antialias is False
    assert cfg.clip.pretrained.startswith("s3://") and cfg.source.model.startswith("s3://")
    from pipeline.jobs.guide import check

    # no s3 here: the files are not read, the model is taken to be what the paper's LDM is (unconditional)
    monkeypatch.setattr("pipeline.jobs.checks.check_clip_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr("pipeline.jobs.checks.source_folder", lambda cfg: None)
    monkeypatch.setattr("pipeline.data.model_store.unet_conditioning", lambda folder: "none")
    check(cfg)  # method ddim, eta 0, chain_steps 10 and no condition: a combination the job accepts

    sched = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                                                  steps_offset=1, set_alpha_to_one=False, clip_sample=False))

    def ldm_grid(n, total=1000):
        c = total // n
        return [t + 1 for t in list(range(0, total, c))[:n]][::-1]

    assert sched.grid(500) == ldm_grid(500) and sched.grid(500)[:2] == [999, 997]
    assert sched.grid(10) == ldm_grid(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6)
    assert sched.final_alpha_cumprod == pytest.approx(float(1 - betas[0]))
