"""The peer row of ``latentshift bench``: diffusers' own CycleDiffusionPipeline on the same model.

CycleDiffusion (Wu & De la Torre 2023, "A latent space of stochastic diffusion models for zero-shot
image editing and guidance") is the translation this project runs at scale; diffusers ships it as
``CycleDiffusionPipeline`` (deprecated but present in 0.42.1, pipelines/deprecated/
stable_diffusion_variants/pipeline_cycle_diffusion.py). Timing it in-process on the same
Stable-Diffusion-shaped folder, images and settings says what a user of the library would get.

Two things in that pipeline shape how it is called here:
  * with classifier-free guidance (guidance_scale > 1) it stacks only items [0] and [1] of the
    doubled latents and prompt embeddings (``__call__``, step 8), so a batch of B > 1 runs 4 instead
    of 4·B UNet rows and every image gets a broadcast of wrong predictions. It is correct for one image
    per call only, so guided runs go one image at a time (the result says so).
  * ``compute_noise`` divides by ``eta``: eta must be > 0 (η = 0 gives inf/NaN, not DDIM).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from pipeline.diffusion.denoiser import resolve_device_dtype

log = logging.getLogger(__name__)


def _folder(model_folder) -> Path:
    """A local folder from a path or a ``pipeline.data.model_store.ModelFolder``."""
    path = Path(model_folder.path) if hasattr(model_folder, "path") else Path(os.fspath(model_folder))
    if not (path / "model_index.json").exists():
        raise ValueError(f"{path} is not a local diffusers folder (no model_index.json)")
    return path


def load_cycle_diffusion(model_folder, device: torch.device, dtype: torch.dtype):
    """CycleDiffusionPipeline from a local SD-shaped folder, with a DDIMScheduler as it requires."""
    from diffusers import CycleDiffusionPipeline, DDIMScheduler

    path = _folder(model_folder)
    # the pipeline's docstring builds DDIMScheduler.from_pretrained(model, subfolder="scheduler"):
    # the folder's β schedule and offsets, whatever scheduler class it names
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(path / "scheduler"))
    pipe = CycleDiffusionPipeline.from_pretrained(
        path, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        dtype=dtype, local_files_only=True, use_safetensors=True,  # torch_dtype= is deprecated in diffusers 0.42
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check(steps: int, strength: float, eta: float) -> None:
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for CycleDiffusionPipeline (its compute_noise divides by eta), got {eta}")
    if int(steps * strength) < 1:
        raise ValueError(f"steps × strength must give at least one step, got {steps} × {strength}")


def cycle_diffusion_images_per_s(
    model_folder,
    images: torch.Tensor,
    *,
    source_prompt: str,
    target_prompt: str,
    steps: int,
    strength: float,
    eta: float,
    guidance_scale: float,
    source_guidance_scale: float,
    batch_size: int,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    warmup: bool = True,
) -> dict:
    """Images/s of CycleDiffusionPipeline translating ``images`` ((N,3,H,W) in [-1,1]) source → target prompt.

    Runs ``batch_size`` images per call (1 when guidance_scale > 1, see the module docstring), after one
    untimed warm-up call when ``warmup``; CUDA is synchronised around the timed loop. Returns images_per_s,
    seconds, images, batch_size (as run), requested_batch_size, peak_gpu_memory_mb (torch's
    max_memory_allocated over warm-up and timed calls; None off CUDA) and all_finite (every output pixel).
    """
    _check(steps, strength, eta)
    dev, dt = resolve_device_dtype(device, dtype)
    pipe = load_cycle_diffusion(model_folder, dev, dt)
    run_batch = 1 if guidance_scale > 1 and batch_size > 1 else batch_size
    if run_batch != batch_size:
        log.warning("CycleDiffusionPipeline guides one image per call correctly; running batch 1, not %d", batch_size)
    # [0, 1] is the range VaeImageProcessor.preprocess documents for tensors; [-1, 1] input is deprecated
    # there and detected by image.min() < 0, which would misread a batch that happens to be all ≥ 0
    pixels = ((images.float().clamp(-1, 1) + 1) / 2).to(dev)
    generator = torch.Generator(device=dev).manual_seed(seed)

    def call(batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        return pipe(
            prompt=[target_prompt] * n, source_prompt=[source_prompt] * n, image=batch, strength=strength,
            num_inference_steps=steps, eta=eta, guidance_scale=guidance_scale,
            source_guidance_scale=source_guidance_scale, generator=generator, output_type="pt",
        ).images

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    if warmup:
        call(pixels[:run_batch])
    finite = torch.ones((), dtype=torch.bool, device=dev)  # checked on device: no sync inside the timed loop
    if cuda:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for i in range(0, pixels.shape[0], run_batch):
        finite &= torch.isfinite(call(pixels[i : i + run_batch])).all()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    n = int(pixels.shape[0])
    return {
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "seconds": seconds,
        "images": n,
        "batch_size": run_batch,
        "requested_batch_size": batch_size,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
        "all_finite": bool(finite),
    }
