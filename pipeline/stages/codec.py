"""Latent codec stages (actor pools): encode images, translate them, decode stored latents.

``EncodeStage`` encodes with the source model (latents only), ``TranslateStage`` encodes with
the source and decodes with the target (CycleDiffusion), ``DecodeStage`` decodes stored
latents with the target.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ModelConfig, OutputConfig, SamplerConfig
from pipeline.data.rows import RowBuffer, RowKind, source_condition
from pipeline.diffusion import Latent, ddim_decode, ddim_invert, dpm_decode, dpm_encode, sample_seed
from pipeline.errors import ModelLoadError
from pipeline.metrics.quality import psnr, ssim
from pipeline.stages.base import ModelStage, load_model
from pipeline.stages.tensors import to_model_range, to_uint8


def check_refine(den, refine_steps: int) -> None:
    """refine_steps counts the model's training timesteps (dpm.refine): say so at load, not per batch."""
    if refine_steps > den.schedule.num_train_timesteps:
        raise ModelLoadError(f"model {den.source!r} has {den.schedule.num_train_timesteps} training timesteps, "
                             f"fewer than sampler.refine_steps = {refine_steps}")


def decode_with(target, z: Latent, section: ModelConfig, refine_steps: int = 0) -> torch.Tensor:
    """Decode a dpm or ddim latent with a target model, condition and guidance."""
    if z.method == "dpm":
        return dpm_decode(target, z, condition=section.condition, guidance_scale=section.guidance_scale,
                          refine_steps=refine_steps)
    return ddim_decode(target, z, condition=section.condition, guidance_scale=section.guidance_scale)


class EncodeStage(ModelStage):
    """Images → latents with the source model."""

    def __init__(self, source: ModelConfig, sampler: SamplerConfig, output: OutputConfig, dtype: str = "auto"):
        super().__init__(output)
        self.source_cfg, self.sampler = source, sampler
        self.source = load_model(source, dtype, sampler.clip_x0)

    def encode(self, x0: torch.Tensor, seeds: list[int]) -> Latent:
        s, src = self.sampler, self.source_cfg
        if s.method == "dpm":
            return dpm_encode(self.source, x0, steps=s.steps, eta=s.eta, strength=s.strength,
                              condition=src.condition, guidance_scale=src.guidance_scale, seeds=seeds)
        z = ddim_invert(self.source, x0, steps=s.steps, strength=s.strength, condition=src.condition,
                        guidance_scale=src.guidance_scale)
        z.seeds = list(seeds)
        return z

    def __call__(self, batch: dict) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        idx = self.samples(batch)
        if len(idx):
            seeds = [sample_seed(self.sampler.seed, f"{batch['shard'][i]}/{batch['key'][i]}") for i in idx]
            src_pixels = np.stack(batch["pixels"][idx])
            z = self.encode(to_model_range(src_pixels), seeds)
            images, scores = self.outputs(src_pixels, z)
            n_lat = self.add_latent_rows(rows, z, batch, idx)
            for j, i in enumerate(idx):
                rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                         kind=RowKind.SAMPLE, pixels=None if images is None else images[j],
                         member_names=batch["member_names"][i], member_data=batch["member_data"][i],
                         timesteps=z.timesteps, seed=seeds[j], latent_rows=n_lat,
                         **({} if scores is None else {"psnr": scores[0][j], "ssim": scores[1][j]}))
        return rows.batch()

    def outputs(self, src_pixels: np.ndarray, z: Latent):
        """Images to write (uint8 NHWC) and (psnr, ssim) per sample; encoding writes latents only."""
        return None, None


class TranslateStage(EncodeStage):
    """Images → source latents → target decode (CycleDiffusion), with PSNR/SSIM against the input."""

    def __init__(self, source: ModelConfig, target: ModelConfig, sampler: SamplerConfig, output: OutputConfig,
                 dtype: str = "auto"):
        super().__init__(source, sampler, output, dtype)
        self.target_cfg = target
        same = target.model == source.model and target.allow_pickle == source.allow_pickle
        self.target = self.source if same else load_model(target, dtype, sampler.clip_x0)
        check_refine(self.target, sampler.refine_steps)

    def decode(self, z: Latent) -> torch.Tensor:
        return decode_with(self.target, z, self.target_cfg, self.sampler.refine_steps)

    def outputs(self, src_pixels: np.ndarray, z: Latent):
        out = to_uint8(self.decode(z))
        a = torch.from_numpy(src_pixels).permute(0, 3, 1, 2)
        b = torch.from_numpy(out).permute(0, 3, 1, 2)
        return out, (psnr(a, b).tolist(), ssim(a, b).tolist())


class DecodeStage(ModelStage):
    """Stored latents → images with the target model."""

    def __init__(self, target: ModelConfig, refine_steps: int = 0, clip_x0: str = "auto", dtype: str = "auto"):
        super().__init__()
        self.target_cfg, self.refine_steps = target, refine_steps
        self.target = load_model(target, dtype, clip_x0)
        check_refine(self.target, refine_steps)

    def __call__(self, batch: dict) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        groups: dict[tuple, list[int]] = {}  # latents decode together when their settings match
        for i in self.samples(batch):
            spec = (tuple(int(t) for t in batch["timesteps"][i]), str(batch["method"][i]), float(batch["eta"][i]),
                    tuple(batch["latent"][i].shape), str(batch["source_model"][i]), str(batch["source_cond"][i]))
            groups.setdefault(spec, []).append(int(i))
        for (timesteps, method, eta, shape, model, cond), idx in groups.items():
            stacked = np.stack([batch["latent"][i] for i in idx])
            z = Latent.from_rows(stacked.reshape(len(idx), -1), shape, list(timesteps), method=method, eta=eta,
                                 seeds=[int(batch["seed"][i]) for i in idx])
            # who encoded it: decoding with the same model and condition is a reconstruction
            z.source, z.condition = model or None, source_condition(cond)
            try:
                out = to_uint8(decode_with(self.target, z, self.target_cfg, self.refine_steps))
            except ValueError as exc:  # e.g. a start-only latent, or a latent of another model kind
                for i in idx:
                    rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                             kind=RowKind.REJECT, error=f"cannot decode: {exc}")
                continue
            for j, i in enumerate(idx):
                rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                         kind=RowKind.SAMPLE, pixels=out[j], timesteps=timesteps, method=method, eta=eta,
                         seed=int(batch["seed"][i]), source_model=batch["source_model"][i],
                         source_cond=batch["source_cond"][i])
        return rows.batch()

