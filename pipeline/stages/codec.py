"""Latent codec: encode, decode and translate as device functions, and the actor-pool stages made of them.

``encode`` (images → latent with the source model), ``decode`` (latent → images with the target
model) and ``translate`` (both: CycleDiffusion) are plain functions of models, config sections and
tensors. Each stage composes what it needs, under ``ModelStage``'s prepare → compute → emit:
``EncodeStage`` writes latents, ``TranslateStage`` latents and images with PSNR/SSIM against the
input (and with ``score.inline`` their CLIP scores), ``DecodeStage`` images of stored latents.
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
from pipeline.stages.base import LatentMaps, ModelStage, Work, load_model, load_scorer
from pipeline.stages.tensors import to_model_range, to_uint8, to_uint8_tensor

# ---- the device work ----------------------------------------------------------------------------


def check_refine(den, refine_steps: int) -> None:
    """refine_steps counts the model's training timesteps (dpm.refine): say so at load, not per batch."""
    if refine_steps > den.schedule.num_train_timesteps:
        raise ModelLoadError(f"model {den.source!r} has {den.schedule.num_train_timesteps} training timesteps, "
                             f"fewer than sampler.refine_steps = {refine_steps}")


def encode(source, section: ModelConfig, sampler: SamplerConfig, x0: torch.Tensor, seeds: list[int]) -> Latent:
    """Images (B, 3, H, W) in [-1, 1] → their latent under the source model's condition and guidance:
    the DPM-Encoder (``sampler.method: dpm``, per-sample noise from ``seeds``) or DDIM inversion."""
    s = sampler
    if s.method == "dpm":
        return dpm_encode(source, x0, steps=s.steps, eta=s.eta, strength=s.strength, condition=section.condition,
                          guidance_scale=section.guidance_scale, seeds=seeds)
    z = ddim_invert(source, x0, steps=s.steps, strength=s.strength, condition=section.condition,
                    guidance_scale=section.guidance_scale)
    z.seeds = list(seeds)
    return z


def decode(target, section: ModelConfig, z: Latent, refine_steps: int = 0) -> torch.Tensor:
    """A dpm or ddim latent → images (B, 3, H, W) in [-1, 1] under the target model's condition and guidance."""
    if z.method == "dpm":
        return dpm_decode(target, z, condition=section.condition, guidance_scale=section.guidance_scale,
                          refine_steps=refine_steps)
    return ddim_decode(target, z, condition=section.condition, guidance_scale=section.guidance_scale)


def translate(source, target, source_section: ModelConfig, target_section: ModelConfig, sampler: SamplerConfig,
              x0: torch.Tensor, seeds: list[int], keep_noise: bool) -> tuple[Latent, torch.Tensor]:
    """Images → (source latent, target images) (CycleDiffusion). With ``sampler.method: dpm`` the
    encoder and decoder walk in lockstep (``dpm_translate``: one UNet call per step when one model is
    both); ``keep_noise``: the latent keeps its noise maps (``output.latents: full``)."""
    s = sampler
    if s.method != "dpm":
        z = encode(source, source_section, s, x0, seeds)
        return z, decode(target, target_section, z, s.refine_steps)
    return dpm_translate(source, target, x0, steps=s.steps, eta=s.eta, strength=s.strength,
                         source_condition=source_section.condition, source_guidance=source_section.guidance_scale,
                         target_condition=target_section.condition, target_guidance=target_section.guidance_scale,
                         seeds=seeds, refine_steps=s.refine_steps, keep_noise=keep_noise)


# ---- the stages ---------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What an encode or translate ``compute`` hands back, on the host: latent maps, and for a
    translation its output images and their metrics."""

    latents: LatentMaps | None
    timesteps: list[int]
    images: np.ndarray | None = None  # (B, H, W, 3) uint8
    psnr: np.ndarray | None = None
    ssim: np.ndarray | None = None
    clip_score: np.ndarray | None = None  # score.inline: CLIP scores of the outputs (pipeline/metrics/scorer.py)
    directional: np.ndarray | None = None


def unpadded(z: Latent, n: int) -> Latent:
    """The batch's own ``n`` samples of a latent whose last rows may pad it (``ModelStage.padded``)."""
    return z[:n] if len(z) > n else z


def sample_rows(stage: ModelStage, batch: dict, work: Work, result: Outputs | None) -> dict:
    """An encode or translate batch's rows out: its rejects, the LATENT rows ``output.latents`` asks for,
    and one SAMPLE row per input with its carried members (and the output image, its PSNR/SSIM and
    scores when ``result`` has them)."""
    rows = RowBuffer()
    stage.pass_rejects(rows, batch)
    if result is None:
        return rows.batch()
    idx = work.idx
    n_lat = stage.add_latent_rows(rows, result.latents, batch, idx)
    per_row = {"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
               "member_names": batch["member_names"][idx], "member_data": batch["member_data"][idx],
               "seed": np.asarray(work.seeds[: len(idx)], dtype=np.int64)}
    if result.images is not None:
        per_row.update(pixels=list(result.images), psnr=result.psnr, ssim=result.ssim)
    if result.clip_score is not None:
        per_row.update(clip_score=result.clip_score, directional=result.directional)
    rows.extend(per_row, kind=RowKind.SAMPLE, timesteps=result.timesteps, latent_rows=n_lat)
    return rows.batch()


class EncodeStage(ModelStage):
    """Images → latents with the source model."""

    concurrent_batches = 2

    def __init__(self, source: ModelConfig, sampler: SamplerConfig, output: OutputConfig, dtype: str = "auto",
                 compile: str = "off"):
        super().__init__(output)
        self.source_cfg, self.sampler = source, sampler
        self.source = load_model(source, dtype, sampler.clip_x0, compile, key="source")
        self.ready()

    def prepare(self, batch: dict) -> Work:
        return self.image_work(batch, self.sampler.seed, self.source)

    def compute(self, work: Work) -> Outputs | None:
        if work.pixels is None:
            return None
        x0 = to_model_range(work.pixels.to(self.source.device, non_blocking=True))
        parts = self.fitting(lambda lo, hi: encode(self.source, self.source_cfg, self.sampler, x0[lo:hi],
                                                   work.seeds[lo:hi]), len(x0))
        z = unpadded(Latent.cat(parts), len(work.idx))
        return Outputs(LatentMaps.of(z, self.output), list(z.timesteps))

    def emit(self, batch: dict, work: Work, result: Outputs | None) -> dict:
        return sample_rows(self, batch, work, result)


class TranslateStage(ModelStage):
    """Images → source latents → target decode (CycleDiffusion), with PSNR/SSIM against the input
    (and with ``score.inline`` the CLIP scores, pipeline/metrics/scorer.py).

    With one model for both (zero-shot), encoder and decoder walk in lockstep: one UNet call per
    step (``dpm_translate``)."""

    concurrent_batches = 2

    def __init__(self, source: ModelConfig, target: ModelConfig, sampler: SamplerConfig, output: OutputConfig,
                 dtype: str = "auto", compile: str = "off", score: ScoreConfig | None = None,
                 clip: ClipConfig | None = None):
        super().__init__(output)
        self.source_cfg, self.target_cfg, self.sampler = source, target, sampler
        self.source = load_model(source, dtype, sampler.clip_x0, compile, key="source")
        same = target.model == source.model and target.allow_pickle == source.allow_pickle
        self.target = self.source if same else load_model(target, dtype, sampler.clip_x0, compile, key="target")
        check_refine(self.target, sampler.refine_steps)
        self.scorer = None
        if score is not None and score.inline:  # loaded once per actor, its text features with it
            self.scorer = load_scorer(clip or ClipConfig(), score, source, target, device=self.source.device)
        self.ready()

    def prepare(self, batch: dict) -> Work:
        return self.image_work(batch, self.sampler.seed, self.source)

    def run(self, x0: torch.Tensor, seeds: list[int]) -> tuple[Latent, torch.Tensor]:
        """The device work of (a piece of) a batch: (latent, output images); `latentshift bench` times it alone."""
        return translate(self.source, self.target, self.source_cfg, self.target_cfg, self.sampler, x0, seeds,
                         keep_noise=self.output.latents == "full")

    def compute(self, work: Work) -> Outputs | None:
        if work.pixels is None:
            return None
        n = len(work.idx)
        src = work.pixels.to(self.source.device, non_blocking=True)
        x0 = to_model_range(src)
        parts = self.fitting(lambda lo, hi: self.run(x0[lo:hi], work.seeds[lo:hi]), len(x0))
        z = unpadded(Latent.cat([p[0] for p in parts]), n)
        # uint8 and metrics on the device; only the bytes the writer needs come back
        out8 = to_uint8_tensor(torch.cat([p[1] for p in parts])[:n])
        a, b = src[:n].permute(0, 3, 1, 2), out8.permute(0, 3, 1, 2)
        result = Outputs(LatentMaps.of(z, self.output), list(z.timesteps), images=out8.cpu().numpy(),
                         psnr=psnr(a, b).cpu().numpy(), ssim=ssim(a, b).cpu().numpy())
        if self.scorer is not None:  # on the uint8 images written, so `latentshift score` gives the same
            result.clip_score, result.directional = self.scorer.score(out8, src[:n])
        return result

    def emit(self, batch: dict, work: Work, result: Outputs | None) -> dict:
        return sample_rows(self, batch, work, result)


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
                parts = self.fitting(lambda lo, hi, z=z: decode(self.target, self.target_cfg, z[lo:hi],
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
