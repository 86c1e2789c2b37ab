"""The decode stage tells a reconstruction from a translation by what the latent file records
(issue 12.2): only decoding with the encoding model and condition replays the σ = 0 residual."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.data.rows import LATENT_INPUT_COLUMNS, RowBuffer, RowKind
from pipeline.diffusion import dpm_encode, load_denoiser
from pipeline.stages.codec import DecodeStage


def rows_for(z, model: str, cond) -> dict:
    rows = RowBuffer(LATENT_INPUT_COLUMNS)
    maps = torch.cat([z.x_start.unsqueeze(1), z.noise], 1).numpy().astype(np.float32)
    for i in range(len(z)):
        rows.add(shard="s", key=f"k{i}", index=i, kind=RowKind.SAMPLE, latent=maps[i],
                 timesteps=np.asarray(z.timesteps, np.int32), method="dpm", eta=z.eta, seed=z.seeds[i],
                 source_model=model, source_cond=json.dumps(cond))
    return rows.batch()


def test_decoding_with_the_encoding_model_reconstructs_and_another_translates(pixel_model):
    den = load_denoiser(str(pixel_model))
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = dpm_encode(den, x0, steps=10, eta=0.5, strength=0.8, seeds=[1, 2])
    expected = ((x0.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    stage = DecodeStage(ModelConfig(model=str(pixel_model)), dtype="float32")

    same = np.stack(stage(rows_for(z, str(pixel_model), None))["pixels"]).astype(np.float64)
    assert np.abs(same - expected).max() <= 1  # exact, up to the uint8 rounding

    # recorded as encoded by another model: a translation, whose last step takes no residual
    other = np.stack(stage(rows_for(z, "some/other-model", None))["pixels"]).astype(np.float64)
    assert np.abs(other - expected).max() > 1


def test_refine_beyond_the_models_training_timesteps_is_named_at_load(pixel_model):
    import pytest

    from pipeline.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"has 1000 training timesteps, fewer than sampler.refine_steps = 1500"):
        DecodeStage(ModelConfig(model=str(pixel_model)), refine_steps=1500, dtype="float32")
