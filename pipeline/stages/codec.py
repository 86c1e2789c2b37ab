"""Latent codec stages (actor pools): encode images, translate them, decode stored latents.

``EncodeStage`` encodes with the source model (latents only), ``TranslateStage`` encodes with
the source and decodes with the target (CycleDiffusion), ``DecodeStage`` decodes stored
latents with the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ClipConfig, ModelConfig, OutputConfig, SamplerConfig, ScoreConfig
from pipeline.data.rows import RowBuffer, RowKind, source_condition
from pipeline.diffusion import (
    Latent,
    ddim_decode,
    ddim_invert,
    dpm_decode,
    dpm_encode,
    dpm_translate,
)
from pipeline.errors import ModelLoadError
from pipeline.metrics.quality import psnr, ssim
from pipeline.stages.base import LatentMaps, ModelStage, Work, load_model
from pipeline.stages.tensors import to_model_range, to_uint8, to_uint8_tensor


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


@dataclass
class Outputs:
    """What ``compute`` hands back, on the host: latent maps, output images, their metrics."""

    latents: LatentMaps | None
    timesteps: list[int]
    images: np.ndarray | None = None  # (B, H, W, 3) uint8
    psnr: np.ndarray | None = None
    ssim: np.ndarray | None = None
    clip_score: np.ndarray | None = None  # score.inline: CLIP scores of the outputs (pipeline/stages/score.py)
    directional: np.ndarray | None = None


class EncodeStage(ModelStage):
    """Images → latents with the source model."""

    concurrent_batches = 2
    scorer = None  # TranslateStage with score.inline: a pipeline.stages.score.Scorer

    def __init__(self, source: ModelConfig, sampler: SamplerConfig, output: OutputConfig, dtype: str = "auto",
                 compile: str = "off", ready: bool = True):
        super().__init__(output)
        self.source_cfg, self.sampler = source, sampler
        self.source = load_model(source, dtype, sampler.clip_x0, compile, key="source")
        if ready:
            self.ready()

    def encode(self, x0: torch.Tensor, seeds: list[int]) -> Latent:
        s, src = self.sampler, self.source_cfg
        if s.method == "dpm":
            return dpm_encode(self.source, x0, steps=s.steps, eta=s.eta, strength=s.strength,
                              condition=src.condition, guidance_scale=src.guidance_scale, seeds=seeds)
        z = ddim_invert(self.source, x0, steps=s.steps, strength=s.strength, condition=src.condition,
                        guidance_scale=src.guidance_scale)
        z.seeds = list(seeds)
        return z

    def run(self, x0: torch.Tensor, seeds: list[int]) -> tuple[Latent, torch.Tensor | None]:
        """The device work of a batch: (latent, output images or None)."""
        return self.encode(x0, seeds), None

    def prepare(self, batch: dict) -> Work:
        return self.image_work(batch, self.sampler.seed, self.source)

    def compute(self, work: Work) -> Outputs | None:
        if work.pixels is None:
            return None
        n = len(work.idx)
        src = work.pixels.to(self.source.device, non_blocking=True)
        x0 = to_model_range(src)
        parts = self.fitting(lambda lo, hi: self.run(x0[lo:hi], work.seeds[lo:hi]), len(x0))
        z = Latent.cat([p[0] for p in parts])
        out = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        z = z[:n] if len(z) > n else z
        result = Outputs(LatentMaps.of(z, self.output), list(z.timesteps))
        if out is not None:  # uint8 and metrics on the device; only bytes the writer needs come back
            out8 = to_uint8_tensor(out[:n])
            a, b = src[:n].permute(0, 3, 1, 2), out8.permute(0, 3, 1, 2)
            result.images = out8.cpu().numpy()
            result.psnr, result.ssim = psnr(a, b).cpu().numpy(), ssim(a, b).cpu().numpy()
            if self.scorer is not None:  # on the uint8 images written, so `latentshift score` gives the same
                result.clip_score, result.directional = self.scorer.score(out8, src[:n])
        return result

    def emit(self, batch: dict, work: Work, result: Outputs | None) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        if result is None:
            return rows.batch()
        idx = work.idx
        n_lat = self.add_latent_rows(rows, result.latents, batch, idx)
        per_row = {"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                   "member_names": batch["member_names"][idx], "member_data": batch["member_data"][idx],
                   "seed": np.asarray(work.seeds[: len(idx)], dtype=np.int64)}
        if result.images is not None:
            per_row.update(pixels=list(result.images), psnr=result.psnr, ssim=result.ssim)
        if result.clip_score is not None:
            per_row.update(clip_score=result.clip_score, directional=result.directional)
        rows.extend(per_row, kind=RowKind.SAMPLE, timesteps=result.timesteps, latent_rows=n_lat)
        return rows.batch()


class TranslateStage(EncodeStage):
    """Images → source latents → target decode (CycleDiffusion), with PSNR/SSIM against the input
    (and with ``score.inline`` the CLIP scores, pipeline/stages/score.py).

    With one model for both (zero-shot), encoder and decoder walk in lockstep: one UNet call per
    step (``dpm_translate``)."""

    def __init__(self, source: ModelConfig, target: ModelConfig, sampler: SamplerConfig, output: OutputConfig,
                 dtype: str = "auto", compile: str = "off", score: ScoreConfig | None = None,
                 clip: ClipConfig | None = None):
        super().__init__(source, sampler, output, dtype, compile, ready=False)
        self.target_cfg = target
        same = target.model == source.model and target.allow_pickle == source.allow_pickle
        self.target = self.source if same else load_model(target, dtype, sampler.clip_x0, compile, key="target")
        check_refine(self.target, sampler.refine_steps)
        if score is not None and score.inline:  # loaded once per actor, its text features with it
            from pipeline.stages.score import Scorer

            self.scorer = Scorer.load(clip or ClipConfig(), score, source, target, device=self.source.device)
        self.ready()

    def decode(self, z: Latent) -> torch.Tensor:
        return decode_with(self.target, z, self.target_cfg, self.sampler.refine_steps)

    def run(self, x0: torch.Tensor, seeds: list[int]) -> tuple[Latent, torch.Tensor]:
        s, src, tgt = self.sampler, self.source_cfg, self.target_cfg
        if s.method != "dpm":
            z = self.encode(x0, seeds)
            return z, self.decode(z)
        return dpm_translate(self.source, self.target, x0, steps=s.steps, eta=s.eta, strength=s.strength,
                             source_condition=src.condition, source_guidance=src.guidance_scale,
                             target_condition=tgt.condition, target_guidance=tgt.guidance_scale, seeds=seeds,
                             refine_steps=s.refine_steps, keep_noise=self.output.latents == "full")


class DecodeStage(ModelStage):
    """Stored latents → images with the target model."""

    concurrent_batches = 2

    def __init__(self, target: ModelConfig, refine_steps: int = 0, clip_x0: str = "auto", dtype: str = "auto",
                 compile: str = "off"):
        super().__init__()
        self.target_cfg, self.refine_steps = target, refine_steps
        self.target = load_model(target, dtype, clip_x0, compile, key="target")
        check_refine(self.target, refine_steps)
        self.ready()

    def prepare(self, batch: dict) -> list[tuple[tuple, list[int], Latent]]:
        """Latents that decode together (same settings), stacked on the host."""
        groups: dict[tuple, list[int]] = {}
        for i in self.samples(batch):
            spec = (tuple(int(t) for t in batch["timesteps"][i]), str(batch["method"][i]), float(batch["eta"][i]),
                    tuple(batch["latent"][i].shape), str(batch["source_model"][i]), str(batch["source_cond"][i]))
            groups.setdefault(spec, []).append(int(i))
        work = []
        for spec, idx in groups.items():
            timesteps, method, eta, shape, model, cond = spec
            rows, seeds = self.padded(self.target, np.stack([batch["latent"][i] for i in idx]).reshape(len(idx), -1),
                                      [int(batch["seed"][i]) for i in idx])
            z = Latent.from_rows(rows, shape, list(timesteps), method=method, eta=eta, seeds=seeds)
            # who encoded it: decoding with the same model and condition is a reconstruction
            z.source, z.condition = model or None, source_condition(cond)
            work.append((spec, idx, z))
        return work

    def compute(self, work) -> list[np.ndarray | str]:
        """Per group: uint8 images, or why the group cannot be decoded."""
        out = []
        for _, idx, z in work:
            try:
                parts = self.fitting(lambda lo, hi, z=z: decode_with(self.target, z[lo:hi], self.target_cfg,
                                                                       self.refine_steps), len(z))
                out.append(to_uint8(torch.cat(parts)[: len(idx)]))
            except ValueError as exc:  # e.g. a start-only latent, or a latent of another model kind
                out.append(f"cannot decode: {exc}")
        return out

    def emit(self, batch: dict, work, result) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        for ((timesteps, method, eta, *_), idx, _), images in zip(work, result, strict=True):
            per_row = {"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx]}
            if isinstance(images, str):
                rows.extend(per_row, kind=RowKind.REJECT, error=images)
                continue
            per_row.update(pixels=list(images), seed=batch["seed"][idx], source_model=batch["source_model"][idx],
                           source_cond=batch["source_cond"][idx])
            rows.extend(per_row, kind=RowKind.SAMPLE, timesteps=timesteps, method=method, eta=eta)
        return rows.batch()
