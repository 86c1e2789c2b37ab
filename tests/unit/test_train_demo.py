"""The demo trainer: a few steps, a checkpoint, a resume, a loadable diffusers folder."""

from __future__ import annotations

import json

import torch

from pipeline.data.model_store import resolve_model
from pipeline.demo.train import TrainConfig, train
from pipeline.diffusion import load_denoiser


def test_train_resume_and_load(tmp_path):
    out = tmp_path / "squares"
    cfg = TrainConfig(domain="squares", out=str(out), steps=2, batch=4, checkpoint_every=1, channels=(8, 16, 16))
    first = train(cfg, progress=False)
    assert first["resumed_from"] == 0 and (tmp_path / ".squares-checkpoint" / "step.json").exists()
    cfg.steps = 3
    second = train(cfg, progress=False)
    assert second["resumed_from"] == 2  # continued from the checkpoint, not from scratch
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists() and (out / "model_index.json").exists()
    den = load_denoiser(str(out))
    assert den.eps(torch.zeros(1, 3, 32, 32), 10).shape == (1, 3, 32, 32)
    den = load_denoiser(resolve_model(str(out)))  # passes the store's checks too (safetensors, layout)
    assert den.eps(torch.zeros(1, 3, 32, 32), 10).shape == (1, 3, 32, 32)
