"""resolve_model (sources, layout, pickle policy) and load_denoiser (assembly): model kinds,
prediction types, CFG, pickle refusal, clear errors, and the layer rule between them."""

from __future__ import annotations

import ast
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.model_store import ModelFolder, resolve_model
from pipeline.diffusion import load_denoiser
from pipeline.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]


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


def _pickled_copy(pixel_model, folder):
    from safetensors.torch import load_file

    shutil.copytree(pixel_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder


def test_pickle_only_weights_are_refused_unless_allowed(pixel_model, tmp_path, caplog):
    folder = _pickled_copy(pixel_model, tmp_path / "pickled")
    with pytest.raises(ModelLoadError, match=r"pickle-based weights \(diffusion_pytorch_model\.bin\).*allow_pickle: true"):
        resolve_model(str(folder))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.model_store"):
        resolved = resolve_model(str(folder), allow_pickle=True)
    assert resolved.allow_pickle and "pickle-based weights from unet/" in caplog.text
    den = load_denoiser(resolved)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(den.eps(x, 5), load_denoiser(str(pixel_model)).eps(x, 5), atol=1e-5)
    # an unresolved local folder cannot slip pickle weights past the policy either
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights in unet/.*resolve_model"):
        load_denoiser(str(folder))
    assert load_denoiser(str(folder), allow_pickle=True).eps(x, 5).shape == x.shape


def test_resolve_model_refuses_pickle_without_torch(pixel_model, tmp_path):
    """resolve_model is the cheap preflight: a pickle-only folder fails before torch/diffusers load."""
    folder = _pickled_copy(pixel_model, tmp_path / "pickled")
    code = (
        "import sys\n"
        "from pipeline.data.model_store import resolve_model\n"
        "from pipeline.errors import ModelLoadError\n"
        "try:\n"
        f"    resolve_model({str(folder)!r})\n"
        "except ModelLoadError as e:\n"
        "    print('ERR', e)\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "ERR" in out and "pickle-based weights (diffusion_pytorch_model.bin)" in out
    assert "LOADED []" in out


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_model_store_imports_no_torch_diffusers_or_transformers():
    imports = _imports(ROOT / "pipeline" / "data" / "model_store.py")
    assert "pipeline.errors" in imports  # the parse saw the file's imports
    heavy = [m for m in imports if m.split(".")[0] in ("torch", "diffusers", "transformers") or m == "safetensors.torch"]
    assert not heavy, heavy


def test_resolving_a_model_loads_no_torch(pixel_model):
    """The preflight opens safetensors headers (safetensors' own reader), never torch."""
    import subprocess
    import sys

    script = ("import sys\nfrom pipeline.data.model_store import resolve_model\n"
              f"resolve_model({str(pixel_model)!r})\n"
              "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_diffusion_imports_nothing_from_pipeline_data():
    files = sorted((ROOT / "pipeline" / "diffusion").glob("*.py"))
    assert any(f.name == "denoiser.py" for f in files)
    bad = {f.name: m for f in files for m in _imports(f) if m == "pipeline.data" or m.startswith("pipeline.data.")}
    assert not bad, bad


def test_load_denoiser_takes_local_folders_only():
    for source in ("s3://x/y", "gs://bucket/model", "bundled:discs", "someone/ddpm-cats"):
        with pytest.raises(ModelLoadError, match=r"resolve_model"):
            load_denoiser(source)


def test_missing_and_malformed_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"not a local folder.*resolve_model"):
        load_denoiser(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a diffusers model folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=r"not a diffusers model folder"):
        load_denoiser(str(tmp_path / "empty"))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"is a file; give the diffusers folder"):
        resolve_model(str(tmp_path / "weights.safetensors"))


def test_resolve_model_checks_layout_and_classes(pixel_model, sd_model, tmp_path):
    resolved = resolve_model(f"file://{pixel_model}")
    assert resolved == ModelFolder(f"file://{pixel_model}", pixel_model, ("unet", "scheduler"), False)
    assert resolve_model(str(sd_model)).components == ("unet", "scheduler", "vae", "text_encoder", "tokenizer")

    listed = shutil.copytree(pixel_model, tmp_path / "listed")
    index = json.loads((listed / "model_index.json").read_text())
    (listed / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelLoadError, match=r"component 'vae' is listed but vae/ is missing"):
        resolve_model(str(listed))

    empty = shutil.copytree(pixel_model, tmp_path / "noweights")
    (empty / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights in unet/ \(expected \*\.safetensors\)"):
        resolve_model(str(empty))

    odd = shutil.copytree(pixel_model, tmp_path / "odd")
    cfg = json.loads((odd / "unet" / "config.json").read_text())
    (odd / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ModelLoadError, match=r"unet class UNet3DConditionModel is not supported"):
        resolve_model(str(odd))
    with pytest.raises(ModelLoadError, match=r"unet class UNet3DConditionModel is not supported"):
        load_denoiser(str(odd))

    no_text = tmp_path / "no-text"
    for sub in ("unet", "scheduler", "vae"):
        shutil.copytree(sd_model / sub, no_text / sub)
    with pytest.raises(ModelLoadError, match=r"UNet2DConditionModel needs text_encoder/ and tokenizer/"):
        resolve_model(str(no_text))
    with pytest.raises(ModelLoadError, match=r"UNet2DConditionModel needs text_encoder/ and tokenizer/"):
        load_denoiser(str(no_text))


def test_denoiser_source_names_the_source(pixel_model):
    assert load_denoiser(str(pixel_model)).source == str(pixel_model)
    assert load_denoiser(pixel_model).source == str(pixel_model)  # os.PathLike
    assert load_denoiser(resolve_model(f"file://{pixel_model}")).source == f"file://{pixel_model}"
    assert load_denoiser(pixel_model, source="s3://models/pixel").source == "s3://models/pixel"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'someone/ddpm-cats'.*local folder"):
        resolve_model("someone/ddpm-cats")


def test_dtype_override(pixel_model):
    den = load_denoiser(str(pixel_model), dtype="float64")
    assert den.dtype == torch.float64 and next(den.unet.parameters()).dtype == torch.float64
    assert den.eps(torch.zeros(1, 3, 16, 16), 3).dtype == torch.float32


def _save_ldm_vq_model(path: Path, layout: str) -> Path:
    """A tiny LDM with a VQ first stage: ``vqvae/`` as diffusers' LDMPipeline saves it
    (CompVis/ldm-celebahq-256's layout), or the VQModel under ``vae/`` (a converted folder)."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, num_vq_embeddings=32,
                 norm_num_groups=4, layers_per_block=1)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=sched).save_pretrained(path, safe_serialization=True)
    if layout == "vae":  # the same weights as vae/, no model_index.json
        (path / "vqvae").rename(path / "vae")
        (path / "model_index.json").unlink()
    return path


@pytest.mark.parametrize("layout", ["vqvae", "vae"])
def test_a_latent_model_with_a_vq_first_stage_encodes_and_decodes_as_ldm(tmp_path, layout):
    """LDM's VQ-f4 models (the FFHQ-256 / CelebA-HQ LDMs of the guidance experiments): x0 is the latent
    before quantisation (LDM encode_first_stage), decoding quantises (VQModel.decode), no scale factor
    (diffusers' LDMPipeline decodes its latents unscaled); the straight-through quantiser passes gradients."""
    from diffusers import VQModel

    folder = _save_ldm_vq_model(tmp_path / "ldm", layout)
    resolved = resolve_model(str(folder))
    assert layout in resolved.components
    den = load_denoiser(resolved)
    peer = VQModel.from_pretrained(folder / layout)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = den.to_model_space(x)
    with torch.no_grad():
        assert torch.allclose(z, peer.encode(x).latents, atol=1e-6)
        assert z.shape == (2, *den.model_space_shape((3, 16, 16))) == (2, 3, 8, 8)
        raw = peer.decode(z).sample
    assert torch.allclose(den.to_pixels(z), raw.clamp(-1, 1), atol=1e-6)
    var = z.clone().requires_grad_(True)
    den.to_pixels_with_grad(var).sum().backward()
    assert var.grad is not None and var.grad.abs().sum() > 0


def test_an_unknown_first_stage_class_is_refused(tmp_path):
    folder = _save_ldm_vq_model(tmp_path / "ldm", "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(ModelLoadError, match="vae/ class AutoencoderTiny is not supported"):
        load_denoiser(str(folder))
