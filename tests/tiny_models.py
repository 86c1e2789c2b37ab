"""Tiny random diffusers models, saved with save_pretrained, for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def _scheduler(kind: str = "ddpm", **overrides):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    kwargs = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    kwargs.update(overrides)
    return cls(**kwargs)


def pixel_unet(sample_size: int = 16, num_class_embeds: int | None = None, seed: int = 0):
    """The tiny pixel UNet of ``latentshift bench --random tiny-pixel`` (its config), at ``sample_size``."""
    from diffusers import UNet2DModel

    from pipeline.tools.random_models import model_configs

    torch.manual_seed(seed)
    return UNet2DModel(**{**model_configs("tiny-pixel")["unet"], "sample_size": sample_size,
                          "num_class_embeds": num_class_embeds})


def save_pixel_model(path: Path, num_class_embeds: int | None = None, seed: int = 0, scheduler=None) -> Path:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with safetensors weights."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=pixel_unet(num_class_embeds=num_class_embeds, seed=seed), scheduler=scheduler or _scheduler())
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_sd_model(path: Path, seed: int = 0, scheduler=None) -> Path:
    """A Stable-Diffusion-shaped folder: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, the
    configs of ``latentshift bench --random tiny-sd`` (char-level CLIP tokenizer, 16 tokens)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.tools.random_models import clip_tokenizer, model_configs

    cfg = model_configs("tiny-sd")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    (path / "_tok_src").mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(path / "_tok_src", cfg["tokenizer"]["model_max_length"])
    text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    sched = scheduler or _scheduler(
        "ddim", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    import shutil

    shutil.rmtree(path / "_tok_src")
    return path
