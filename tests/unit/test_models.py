"""load_denoiser: model kinds, prediction types, CFG, pickle refusal, clear errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from pipeline.diffusion import load_denoiser
from pipeline.errors import ModelLoadError


def test_pixel_model_from_pipeline_folder(pixel_model):
    den = load_denoiser(str(pixel_model))
    assert den.conditioning == "none" and not den.is_latent_model
    assert den.device.type == "cpu" and den.dtype == torch.float32
    assert den.schedule.clip_sample  # DDPM default; honoured identically by encoder and decoder
    assert not any(p.requires_grad for p in den.unet.parameters())


def test_folder_with_unet_and_scheduler_only(pixel_model, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(pixel_model / "unet", folder / "unet")
    shutil.copytree(pixel_model / "scheduler", folder / "scheduler")
    den = load_denoiser(str(folder))
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(den.eps(x, 10), load_denoiser(str(pixel_model)).eps(x, 10), atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types_are_converted_to_eps(models_dir, prediction_type):
    from tiny_models import _scheduler, save_pixel_model

    path = save_pixel_model(models_dir / f"pred-{prediction_type}", seed=4,
                            scheduler=_scheduler(prediction_type=prediction_type, clip_sample=False))
    den = load_denoiser(str(path))
    x_t, t = torch.randn(2, 3, 16, 16), 300
    a = float(den.schedule.alphas_cumprod[t])
    out = den.unet(x_t, torch.tensor([t, t])).sample
    if prediction_type == "v_prediction":
        expected = math.sqrt(a) * out + math.sqrt(1 - a) * x_t  # ε = √ᾱ v + √(1−ᾱ) x_t
    else:
        expected = (x_t - math.sqrt(a) * out) / math.sqrt(1 - a)  # ε from x̂0
    assert torch.allclose(den.eps(x_t, t), expected, atol=1e-5)


def test_classifier_free_guidance_formula(class_model):
    den = load_denoiser(str(class_model), null_class=3)
    x, t = torch.randn(2, 3, 16, 16), 500
    ts = torch.tensor([t, t])
    e_c = den.unet(x, ts, class_labels=torch.tensor([0, 1])).sample
    e_u = den.unet(x, ts, class_labels=torch.tensor([3, 3])).sample
    assert torch.allclose(den.eps(x, t, [0, 1], guidance_scale=4.0), e_u + 4.0 * (e_c - e_u), atol=1e-5)
    assert torch.allclose(den.eps(x, t, [0, 1]), e_c, atol=1e-6)


def test_class_model_errors(class_model):
    den = load_denoiser(str(class_model))
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="null_class"):
        den.eps(x, 10, [0], guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"not a class index in 0\.\.3"):
        den.eps(x, 10, [7])
    with pytest.raises(ModelLoadError, match="null_class 9"):
        load_denoiser(str(class_model), null_class=9)


def test_text_guidance_uses_the_empty_prompt(sd_model):
    den = load_denoiser(str(sd_model))
    assert den.vae_scaling_factor == pytest.approx(0.18215)
    x, t = torch.randn(1, 4, 8, 8), 400
    e_c = den.eps(x, t, "a cat")
    e_u = den.eps(x, t, "")
    assert torch.allclose(den.eps(x, t, "a cat", guidance_scale=3.0), e_u + 3.0 * (e_c - e_u), atol=1e-5)
    assert not torch.allclose(e_c, e_u)


def test_unconditional_model_rejects_a_condition(pixel_model):
    with pytest.raises(ValueError, match="unconditional"):
        load_denoiser(str(pixel_model)).eps(torch.zeros(1, 3, 16, 16), 10, "a cat")


def test_pickle_only_weights_are_refused_unless_allowed(pixel_model, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(pixel_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"pickle-based weights \(diffusion_pytorch_model\.bin\).*allow_pickle: true"):
        load_denoiser(str(folder))
    den = load_denoiser(str(folder), allow_pickle=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(den.eps(x, 5), load_denoiser(str(pixel_model)).eps(x, 5), atol=1e-5)


def test_missing_and_malformed_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such folder"):
        load_denoiser(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a diffusers model folder"):
        load_denoiser(str(tmp_path / "empty"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'someone/ddpm-cats'.*local folder"):
        load_denoiser("someone/ddpm-cats")


def test_dtype_override(pixel_model):
    den = load_denoiser(str(pixel_model), dtype="float64")
    assert den.dtype == torch.float64 and next(den.unet.parameters()).dtype == torch.float64
    assert den.eps(torch.zeros(1, 3, 16, 16), 3).dtype == torch.float32
