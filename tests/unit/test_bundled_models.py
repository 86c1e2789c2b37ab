"""The models this project ships in pipeline/assets: loadable the ways users load them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.diffusion import load_denoiser
from pipeline.errors import ModelLoadError

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "assets"


@pytest.mark.parametrize("name", ["discs", "squares"])
def test_bundled_model_loads_and_is_small(name):
    folder = ASSETS / name
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 8 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]  # safetensors only
    den = load_denoiser(f"bundled:{name}")
    assert den.conditioning == "none" and den.unet.config.sample_size == 32
    assert den.eps(torch.zeros(1, 3, 32, 32), 500).shape == (1, 3, 32, 32)
    from diffusers import DDPMPipeline

    DDPMPipeline.from_pretrained(folder)  # the folder is a plain diffusers pipeline


def test_unknown_bundled_model_names_the_fix():
    with pytest.raises(ModelLoadError, match=r"train-demo --domain triangles"):
        load_denoiser("bundled:triangles")
