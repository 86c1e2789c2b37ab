"""dpm_translate: with one model, the encoder and decoder walk in lockstep (one network call per
step, as diffusers' CycleDiffusionPipeline); the result is encode-then-decode's."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import dpm_decode, dpm_encode, dpm_translate, load_denoiser

pytestmark = pytest.mark.unit


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class CountCalls:
    """Counts the UNet's forward calls and the rows they carried."""

    def __init__(self, unet):
        self.calls, self.rows = 0, 0
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        self.rows += args[0].shape[0]


SETTINGS = dict(steps=10, eta=0.1, strength=0.6, seeds=[11, 12, 13])


@pytest.mark.parametrize(("source_guidance", "target_guidance"), [(1.0, 2.0), (1.5, 1.0)])
def test_zero_shot_lockstep_equals_encode_then_decode(sd_model, source_guidance, target_guidance):
    den = load_denoiser(str(sd_model))
    x0 = images(3, 16)
    conds = dict(source_condition="a cat", target_condition="a dog")
    z_ref = dpm_encode(den, x0, condition=conds["source_condition"], guidance_scale=source_guidance, **SETTINGS)
    x_ref = dpm_decode(den, z_ref, condition=conds["target_condition"], guidance_scale=target_guidance)

    counter = CountCalls(den.unet)
    z, x = dpm_translate(den, den, x0, source_guidance=source_guidance, target_guidance=target_guidance, **conds,
                         **SETTINGS)
    k = len(z.timesteps)
    assert counter.calls == k  # one call per step, where encode + decode make 2k
    branches = (2 if source_guidance != 1 else 1) + (2 if target_guidance != 1 else 1)
    assert counter.rows == k * 3 * branches  # the call carries source, target and their guidance branches
    assert torch.allclose(z.x_start, z_ref.x_start) and torch.allclose(z.noise, z_ref.noise, atol=1e-4)
    assert (x - x_ref).abs().max().item() < 1e-4
    assert (x - x0).abs().mean() > 1e-3  # a translation, not the input back


def test_lockstep_with_the_same_condition_is_a_reconstruction(pixel_model):
    den = load_denoiser(str(pixel_model))
    x0 = images(3, 16, seed=1)
    _, x = dpm_translate(den, den, x0, **SETTINGS)
    assert (x - x0).abs().max().item() < 1e-4


def test_two_models_and_start_only_latents(pixel_model, other_pixel_model):
    src, tgt = load_denoiser(str(pixel_model)), load_denoiser(str(other_pixel_model))
    x0 = images(3, 16, seed=2)
    z_ref = dpm_encode(src, x0, **SETTINGS)
    z, x = dpm_translate(src, tgt, x0, **SETTINGS, keep_noise=False)
    assert z.start_only and torch.equal(z.x_start, z_ref.x_start)
    assert torch.allclose(x, dpm_decode(tgt, z_ref), atol=1e-5)
    z_one, x_one = dpm_translate(src, src, x0, **SETTINGS, keep_noise=False)
    assert z_one.start_only and torch.allclose(z_one.x_start, z_ref.x_start)
