"""``latentshift bench --search``: the zero-shot search's candidates/s against the official loop.

On one text-to-image model (random weights of a real shape, or a config's model) and a CLIP of the
official ranking's shape (ViT-B-32, random weights built from open_clip's config: nothing is
downloaded), it times, in-process on the same images and settings:

  search        ``diffusion.search.zero_shot_search``: a batch of inputs × trials per walk, every decoder
                scale decoded alongside the encoder, CLIP ranking on the device
  official      the official loop (cycle-diffusion stable_diffusion_stochastic_text_wrapper.py:186-235):
                one image at a time; per (trial, skip) one encode walk, then one decode walk per decoder
                scale; each candidate scored as it comes

and prints candidates/s for both, the speed-up, and the cost of the official grid per image
(15 trials × 6 skips × 6 decoder scales = 540 candidates) at each rate. Trials cost the same each, so
timing ``--trials`` of them and scaling to 15 is exact up to noise. Figures, never asserts.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

OFFICIAL = {"trials": 15, "skips": (15, 20, 25, 30, 40, 50), "encoder_scales": (1.0,),
            "decoder_scales": (1.0, 1.5, 2.0, 3.0, 4.0, 5.0), "steps": 99}  # config/experiments/…_stochastic_1.cfg:7-13
SETUPS = {"sd-1": {"steps": 99, "images": 2, "clip": "ViT-B-32"},
          "tiny-sd": {"steps": 10, "images": 4, "clip": "tiny"}}
PROMPTS = ("a photo of a cat", "a photo of a dog")


def _clip(kind: str, folder: Path, device):
    from pipeline.metrics.clip import load_clip
    from pipeline.tools.random_clip import save_random_clip

    if kind == "tiny":
        config, weights = save_random_clip(folder)
        return load_clip(config, weights, device=device)
    import open_clip
    from safetensors.torch import save_file

    weights = folder / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(kind).state_dict().items()}, str(weights))
    return load_clip(kind, str(weights), device=device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_search_bench(shape: str = "tiny-sd", images: int | None = None, trials: int = 1, model: str | None = None,
                     dtype: str = "auto", out=sys.stdout) -> dict:
    from pipeline.data.rows import strength_keeping
    from pipeline.diffusion import dpm_decode, dpm_encode, load_denoiser
    from pipeline.diffusion.search import SearchGrid, candidate_seed, zero_shot_search
    from pipeline.metrics.clip import directional_similarity
    from pipeline.tools.random_models import image_size, save_random_model

    setup = SETUPS[shape]
    n = images or setup["images"]
    steps = setup["steps"]
    scale = steps / OFFICIAL["steps"]  # the tiny smoke run keeps the grid's shape on a shorter walk
    skips = tuple(max(0, min(steps - 1, round(s * scale))) for s in OFFICIAL["skips"])
    grid = SearchGrid(trials=trials, encoder_scales=OFFICIAL["encoder_scales"], skips=tuple(dict.fromkeys(skips)),
                      decoder_scales=OFFICIAL["decoder_scales"], steps=steps)
    with tempfile.TemporaryDirectory(prefix="latentshift-search-bench-") as tmp:
        folder = Path(model) if model else save_random_model(Path(tmp) / shape, shape)
        den = load_denoiser(str(folder), dtype=dtype)
        clip = _clip(setup["clip"], Path(tmp), den.device)
        size = image_size(shape)
        x0 = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(den.device)
        src_text, trg_text = clip.text_features([PROMPTS[0]]), clip.text_features([PROMPTS[1]])
        with torch.no_grad():
            src_feat = clip.image_features(x0)

        def score(candidates, rows):
            with torch.no_grad():
                return directional_similarity(src_feat[rows], clip.image_features(candidates), src_text, trg_text)

        kw = dict(eta=0.1, source_condition=PROMPTS[0], target_condition=PROMPTS[1])
        seeds = list(range(n))
        zero_shot_search(den, x0[:1], seeds[:1], score, SearchGrid(1, (1.0,), (grid.skips[-1],), (1.0,), steps), **kw)
        _sync(den.device)  # warm-up: kernels chosen, caches filled
        if den.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(den.device)
        start = time.perf_counter()
        zero_shot_search(den, x0, seeds, score, grid, **kw)
        _sync(den.device)
        search_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(den.device) if den.device.type == "cuda" else None

        start = time.perf_counter()
        official_images = 1  # one image through the official loop is enough to time it
        for trial, w_enc, skip in itertools.product(range(trials), grid.encoder_scales, grid.skips):
            z = dpm_encode(den, x0[:1], steps=steps, eta=0.1, strength=strength_keeping(steps, steps - skip),
                           condition=PROMPTS[0], guidance_scale=w_enc, seeds=[candidate_seed(0, trial, w_enc, skip)])
            for w_dec in grid.decoder_scales:
                score(dpm_decode(den, z, condition=PROMPTS[1], guidance_scale=w_dec), torch.zeros(1, dtype=torch.long))
        _sync(den.device)
        official_s = time.perf_counter() - start

    per_image = len(grid)
    full = OFFICIAL["trials"] / trials  # trials cost alike: the official 15 are this many times the timed ones
    r = {"shape": shape, "device": str(den.device) + (f" ({torch.cuda.get_device_name(den.device)})"
                                                        if den.device.type == "cuda" else ""),
         "dtype": str(den.dtype).removeprefix("torch."), "steps": steps, "skips": list(grid.skips),
         "decoder_scales": list(grid.decoder_scales), "trials_timed": trials, "images": n,
         "candidates_per_image": per_image,
         "search_candidates_per_s": round(n * per_image / search_s, 3),
         "official_candidates_per_s": round(official_images * per_image / official_s, 3),
         "official_grid_s_per_image_search": round(search_s / n * full, 2),
         "official_grid_s_per_image_official": round(official_s / official_images * full, 2),
         "peak_gpu_memory_gb": round(peak / 2**30, 2) if peak else None}
    r["speedup"] = round(r["search_candidates_per_s"] / r["official_candidates_per_s"], 2)
    lines = [f"latentshift bench --search  {shape} on {r['device']} ({r['dtype']}), {steps} steps, skips {r['skips']}, "
             f"decoder scales {r['decoder_scales']}, {trials} trial(s) timed",
             f"  search     {r['search_candidates_per_s']} candidates/s ({n} images batched)",
             f"  official   {r['official_candidates_per_s']} candidates/s (one image, one walk at a time)",
             f"  speed-up   {r['speedup']}x",
             f"  per image  official grid (15 trials, {OFFICIAL['trials'] * per_image // trials} candidates): "
             f"{r['official_grid_s_per_image_search']} s searched, {r['official_grid_s_per_image_official']} s official"]
    if peak:
        lines.append(f"  memory     peak {r['peak_gpu_memory_gb']} GB on the GPU (search)")
    out.write("\n".join(lines) + "\n" + json.dumps(r) + "\n")
    out.flush()
    return r
