"""Tiny random diffusers models, saved with save_pretrained, for tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?-'"


def _scheduler(kind: str = "ddpm", **overrides):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    kwargs = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    kwargs.update(overrides)
    return cls(**kwargs)


def pixel_unet(sample_size: int = 16, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=num_class_embeds,
    )


def save_pixel_model(path: Path, num_class_embeds: int | None = None, seed: int = 0, scheduler=None) -> Path:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with safetensors weights."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=pixel_unet(num_class_embeds=num_class_embeds, seed=seed), scheduler=scheduler or _scheduler())
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _clip_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in CLIP_VOCAB_CHARS.replace(" ", ""):
        tokens += [c, c + "</w>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    return tok, len(tokens)


def save_sd_model(path: Path, seed: int = 0, scheduler=None) -> Path:
    """A Stable-Diffusion-shaped folder: UNet2DConditionModel + AutoencoderKL + CLIP text encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    tok, vocab = _clip_tokenizer(path / "_tok_src")
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
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
