"""Model families: one layout description (pipeline/model_layout.py) that the model store checks a
folder against and the denoiser loads it by, and one adapter per family behind the ε seam
(pipeline/diffusion/families/)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.model_store import resolve_model, unet_conditioning
from pipeline.diffusion import families, load_denoiser
from pipeline.diffusion.denoiser import check_weights_fit
from pipeline.errors import ModelLoadError
from pipeline.model_layout import FAMILIES, PIXEL, TEXT, weight_components

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_NAMES = {"COMPONENTS", "FIRST_STAGES", "FIRST_STAGE_CLASSES", "UNET_CLASSES"}


def test_every_family_has_one_adapter():
    assert set(families.ADAPTERS) == {f.name for f in FAMILIES}
    for family in FAMILIES:
        module = families.adapter(family)
        assert module.FAMILY is family and module.__name__.endswith(f".{family.name}")
        assert callable(module.load)
        assert not family.encoders or callable(module.build)  # check_weights_fit builds its encoders


def test_the_layout_is_described_once():
    """No module but pipeline/model_layout.py names the component folders or the supported classes."""
    defined = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = {t.id for t in targets if isinstance(t, ast.Name)} & LAYOUT_NAMES
            names |= {node.name} if isinstance(node, ast.FunctionDef) and node.name.endswith("read_json") else set()
            for name in names:
                defined.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert all(paths == ["pipeline/model_layout.py"] for paths in defined.values()), defined


@pytest.mark.parametrize(("fixture", "kind", "family"),
                         [("pixel_model", "none", PIXEL), ("class_model", "class", PIXEL), ("sd_model", "text", TEXT)])
def test_store_and_denoiser_agree_on_the_conditioning(request, fixture, kind, family):
    folder = resolve_model(str(request.getfixturevalue(fixture)))
    den = load_denoiser(folder)
    assert unet_conditioning(folder) == den.conditioning == kind
    assert type(den.family).__module__ == families.adapter(family).__name__
    assert den.is_latent_model == (family is TEXT)


def test_weight_components_follow_the_family():
    present = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
    assert weight_components(TEXT, present) == ["unet", "vae", "text_encoder"]
    assert weight_components(PIXEL, present) == ["unet", "vae"]  # a stray text encoder is not the unet's
    assert weight_components(PIXEL, ("unet", "scheduler", "vqvae")) == ["unet", "vqvae"]


def test_check_weights_fit_builds_the_text_encoder_of_a_text_model(sd_model, tmp_path):
    check_weights_fit(sd_model)
    model = shutil.copytree(sd_model, tmp_path / "sd")
    config = json.loads((model / "text_encoder" / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"text_encoder/model\.safetensors holds .* do not fit this config"):
        check_weights_fit(model)


def test_the_text_family_caches_prompt_embeddings(sd_model):
    den = load_denoiser(str(sd_model))
    x = torch.randn(2, 4, 8, 8)
    first = den.eps(x, 300, ["a cat", "a cat"])
    assert list(den.family._prompt_cache) == ["a cat"]
    assert torch.allclose(den.eps(x, 300, "a cat"), first)
