"""Learned σ (improved DDPM / ADM: 2C output channels, ε the first C): every sampler gets ε alone, also
under classifier-free guidance, and the model says so (``Denoiser.learned_variance``)."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from pipeline.diffusion import (
    Latent,
    ddim_decode,
    ddim_invert,
    dpm_decode,
    dpm_encode,
    load_denoiser,
)
from pipeline.tools.random_models import model_configs

pytestmark = pytest.mark.unit


def _learned_sigma_model(path, num_class_embeds=None):
    torch.manual_seed(0)
    config = {**model_configs("tiny-pixel")["unet"], "sample_size": 16, "out_channels": 6,
              "num_class_embeds": num_class_embeds}
    unet = UNet2DModel(**config)
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(path, safe_serialization=True)
    return unet.eval()


def test_eps_is_the_first_three_channels_and_the_model_says_so(tmp_path, caplog):
    unet = _learned_sigma_model(tmp_path / "m")
    with caplog.at_level(logging.INFO):
        den = load_denoiser(tmp_path / "m", device="cpu", dtype="float32")
    assert den.learned_variance and "learned variance (6 output channels): ε is the first 3" in caplog.text
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        raw = unet(x, torch.full((2,), 500)).sample
    assert raw.shape[1] == 6
    torch.testing.assert_close(den.eps(x, 500), raw[:, :3])


def test_guidance_mixes_eps_only(tmp_path):
    unet = _learned_sigma_model(tmp_path / "m", num_class_embeds=4)
    den = load_denoiser(tmp_path / "m", device="cpu", dtype="float32", null_class=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        u = unet(x, torch.full((2,), 300), class_labels=torch.tensor([3, 3])).sample[:, :3]
        c = unet(x, torch.full((2,), 300), class_labels=torch.tensor([1, 2])).sample[:, :3]
    torch.testing.assert_close(den.eps(x, 300, condition=[1, 2], guidance_scale=2.5), u + 2.5 * (c - u),
                               rtol=1e-5, atol=1e-5)


def test_samplers_run_on_a_learned_sigma_model(tmp_path):
    _learned_sigma_model(tmp_path / "m")
    den = load_denoiser(tmp_path / "m", device="cpu", dtype="float32")
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ddim_invert(den, x0, steps=10, t0=401)
    assert isinstance(z, Latent) and z.x_start.shape == (2, 3, 16, 16)
    assert ddim_decode(den, z).shape == (2, 3, 16, 16)
    dz = dpm_encode(den, x0, steps=5, eta=1.0, seeds=[1, 2])
    # DPM-Encoder's exact reconstruction holds for any ε: it does with the ε half of a 6-channel output
    torch.testing.assert_close(dpm_decode(den, dz), x0, rtol=0, atol=1e-4)


def test_a_model_without_a_variance_half_is_untouched(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(**{**model_configs("tiny-pixel")["unet"], "sample_size": 16})
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "m", safe_serialization=True)
    den = load_denoiser(tmp_path / "m", device="cpu", dtype="float32")
    assert not den.learned_variance
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(den.eps(x, 10), unet.eval()(x, torch.full((1,), 10)).sample)
