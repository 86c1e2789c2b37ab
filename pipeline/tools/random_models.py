"""Random-weight diffusers model folders of real and tiny shapes, built offline.

``latentshift bench`` measures speed, and speed depends on a model's shape, not on its weights,
so it needs folders that load exactly like the published checkpoints without downloading them.
``save_random_model`` writes such a folder (``save_pretrained``, safetensors) that
``pipeline.diffusion.load_denoiser`` and ``pipeline.data.model_store.resolve_model`` accept:

  ddpm-256    UNet2DModel of google/ddpm-ema-church-256 / ddpm-celebahq-256 (113.67 M parameters)
              + DDPMScheduler, as a DDPMPipeline folder; 256 px images.
  sd-1        Stable Diffusion 1.x: UNet2DConditionModel (859.52 M), AutoencoderKL (83.65 M),
              CLIPTextModel ViT-L/14 text tower (123.06 M), a synthetic CLIPTokenizer and the
              DDIMScheduler of runwayml/stable-diffusion-v1-5, as a StableDiffusionPipeline folder;
              512 px images, 64×64×4 latents.
  tiny-pixel  the tiny UNet2DModel of tests/tiny_models.py at 32 px (CPU smoke bench).
  tiny-sd     the tiny Stable-Diffusion-shaped model of tests/tiny_models.py; its 2-block VAE
              halves the size, so 16 px images give 8×8×4 latents (CPU smoke bench).

The parameter counts above were checked by building the modules on the ``meta`` device
(tests/unit/test_bench_tools.py asserts them the same way).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

SHAPES = ("ddpm-256", "sd-1", "tiny-pixel", "tiny-sd")
_IMAGE_SIZE = {"ddpm-256": 256, "sd-1": 512, "tiny-pixel": 32, "tiny-sd": 16}
_TEXT_SHAPES = ("sd-1", "tiny-sd")

# google/ddpm-ema-church-256 and ddpm-celebahq-256 unet/config.json (converted from the DDPM TF
# checkpoints of Ho et al. 2020, hence padding 0, freq_shift 1, no flip, eps 1e-6, one attention head).
_DDPM_256_UNET = dict(
    sample_size=256,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)
# the same checkpoints' scheduler_config.json: the DDPM paper's linear β schedule
_DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

# runwayml/stable-diffusion-v1-5 unet/config.json. The diffusers defaults are close but not equal
# (cross_attention_dim defaults to 1280, sample_size to None), so every value is spelled out.
_SD1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
)
# runwayml/stable-diffusion-v1-5 vae/config.json
_SD1_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.18215,
)
# openai/clip-vit-large-patch14 text tower, as in runwayml/stable-diffusion-v1-5 text_encoder/config.json.
# The token ids follow the synthetic tokenizer (<|startoftext|> = 0, <|endoftext|> = 1), which only
# changes which row of the 49408-token embedding is read, not the shapes or the cost.
_SD1_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as a DDIMScheduler
_SD1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# tests/tiny_models.py: pixel_unet (here at 32 px) and save_sd_model
_TINY_PIXEL_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=4,
)
_TINY_SD_UNET = dict(
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
_TINY_SD_VAE = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
)
_TINY_SD_TEXT = dict(
    vocab_size=None,  # the synthetic tokenizer's size, filled in by model_configs
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

# A character-level CLIP vocabulary (as tests/tiny_models.py builds it): every prompt tokenizes,
# nothing is downloaded, and the text encoder still sees model_max_length tokens.
CLIP_VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"


def _check(shape: str) -> str:
    if shape not in SHAPES:
        raise ValueError(f"model shape {shape!r} is not one of {', '.join(SHAPES)}")
    return shape


def image_size(shape: str) -> int:
    """Side in pixels of the square images the shape is built for."""
    return _IMAGE_SIZE[_check(shape)]


def is_text_model(shape: str) -> bool:
    """Whether the shape is text-conditional (a Stable Diffusion folder that takes prompts)."""
    return _check(shape) in _TEXT_SHAPES


def _clip_tokens() -> list[str]:
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in CLIP_VOCAB_CHARS:
        tokens += [c, c + "</w>"]
    return tokens


def model_configs(shape: str) -> dict[str, dict]:
    """Constructor arguments per component: unet, scheduler, and vae, text_encoder, tokenizer for text models.

    Exposed so that tests can check the real shapes without building 860 M parameters.
    """
    _check(shape)
    if shape == "ddpm-256":
        return {"unet": dict(_DDPM_256_UNET), "scheduler": dict(_DDPM_SCHEDULER)}
    if shape == "tiny-pixel":
        return {"unet": dict(_TINY_PIXEL_UNET), "scheduler": dict(_DDPM_SCHEDULER)}
    if shape == "sd-1":
        return {"unet": dict(_SD1_UNET), "vae": dict(_SD1_VAE), "text_encoder": dict(_SD1_TEXT),
                "tokenizer": {"model_max_length": 77}, "scheduler": dict(_SD1_SCHEDULER)}
    text = dict(_TINY_SD_TEXT, vocab_size=len(_clip_tokens()))
    return {"unet": dict(_TINY_SD_UNET), "vae": dict(_TINY_SD_VAE), "text_encoder": text,
            "tokenizer": {"model_max_length": 16}, "scheduler": dict(_SD1_SCHEDULER)}


def build_modules(shape: str) -> dict[str, torch.nn.Module]:
    """The weight-bearing modules of ``shape``, randomly initialised on the current default device.

    Called under ``with torch.device(...)``: "cuda" to initialise the real shapes quickly, "meta"
    to count parameters without allocating them.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = model_configs(shape)
    if not is_text_model(shape):
        return {"unet": UNet2DModel(**cfg["unet"])}
    return {
        "unet": UNet2DConditionModel(**cfg["unet"]),
        "vae": AutoencoderKL(**cfg["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
    }


def clip_tokenizer(folder: Path, model_max_length: int):
    """A CLIPTokenizer over a char-level vocab.json and an empty merges.txt (no download)."""
    from transformers import CLIPTokenizer

    tokens = _clip_tokens()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def save_random_model(path, shape: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight diffusers folder of ``shape`` to ``path`` and return it.

    Weights are initialised in float32 (on CUDA when present: the sd-1 shapes take seconds there and
    much longer on a CPU), then cast to ``dtype`` (float16 halves the folder, 2.1 GB for sd-1) and saved
    with safetensors. ``seed`` makes the weights reproducible; the global RNG state is left as it was.
    """
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

    path = Path(path)
    cfg = model_configs(shape)
    build_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = [torch.cuda.current_device()] if build_device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(build_device):
        torch.manual_seed(seed)
        modules = build_modules(shape)
    # torch.nn.Module.to, not ModelMixin.to: diffusers 0.42 warns on every dtype cast ("modules that should be
    # kept in float32: []") even when there are none; this casts floating-point tensors only, as that does.
    modules = {k: torch.nn.Module.to(m, device="cpu", dtype=dtype).eval() for k, m in modules.items()}
    if not is_text_model(shape):
        pipe = DDPMPipeline(unet=modules["unet"], scheduler=DDPMScheduler(**cfg["scheduler"]))
        pipe.save_pretrained(path, safe_serialization=True)
        return path
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = clip_tokenizer(Path(tok_dir), cfg["tokenizer"]["model_max_length"])
        pipe = StableDiffusionPipeline(
            vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer, unet=modules["unet"],
            scheduler=DDIMScheduler(**cfg["scheduler"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
    return path
