"""The models this project ships in pipeline/assets: loadable the ways users load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.model_store import resolve_model
from pipeline.diffusion import load_denoiser
from pipeline.errors import ModelLoadError

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "assets"


@pytest.mark.parametrize("name", ["discs", "squares"])
def test_bundled_model_loads_and_is_small(name):
    folder = ASSETS / name
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 8 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]  # safetensors only
    resolved = resolve_model(f"bundled:{name}")
    assert resolved.path == folder and resolved.components == ("unet", "scheduler")
    den = load_denoiser(resolved)
    assert den.source == f"bundled:{name}"
    assert den.conditioning == "none" and den.unet.config.sample_size == 32
    assert den.eps(torch.zeros(1, 3, 32, 32), 500).shape == (1, 3, 32, 32)
    from diffusers import DDPMPipeline

    DDPMPipeline.from_pretrained(folder)  # the folder is a plain diffusers pipeline


def test_unknown_bundled_model_names_the_fix():
    with pytest.raises(ModelLoadError, match=r"train-demo --domain triangles"):
        resolve_model("bundled:triangles")


@pytest.mark.parametrize("name", ["discs", "squares"])
def test_bundled_model_passes_a_reduced_quality_gate(name):
    """32 ancestral samples (the full gate is 256; see pipeline/assets/README.md): ≥ 90% its own shape."""
    from pipeline.demo.common import quality_gate

    gate = quality_gate(f"bundled:{name}", name, count=32, steps=50)
    assert gate["rate"] >= 0.9, gate


def test_plain_samples_are_seeded_and_the_last_step_adds_no_noise():
    from pipeline.demo.common import plain_samples

    a = plain_samples("bundled:discs", 4, steps=10, seed=3)
    assert (a == plain_samples("bundled:discs", 4, steps=10, seed=3)).all()
    assert (a != plain_samples("bundled:discs", 4, steps=10, seed=4)).any()
    # flat shapes on a flat background: unit noise added after the last step would make neighbours differ by ~100
    assert np.abs(np.diff(a.astype(int), axis=2)).mean() < 20
