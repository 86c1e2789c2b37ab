"""The guide stage (actor pool): image numbers → guided latents (DPM, or DDIM z = x_T) → images (CycleDiffusion guidance).

Per batch of candidate rows (``candidate`` = the image's number): each sample's seed is
``sample_seed(sampler.seed, key)``; z⁽⁰⁾ and the Langevin noise come from it alone
(``pipeline.diffusion.guidance``), so an image is the same whatever batch or actor makes it, and a
re-run of a shard remakes it exactly. Only indices are shipped; nothing but the images and (as
``output.latents`` asks) the final z leave the actor.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.config import ClipConfig, GuideConfig, ModelConfig, OutputConfig, SamplerConfig
from pipeline.data.rows import RowBuffer, RowKind
from pipeline.diffusion import Latent, sample_seed
from pipeline.diffusion.guidance import guide, initial_latent
from pipeline.metrics.energy import ClipEnergy, make_energy
from pipeline.stages.base import LatentMaps, ModelStage, Work, load_clip_section, load_model
from pipeline.stages.tensors import to_uint8_tensor

log = logging.getLogger(__name__)


class GuideStage(ModelStage):
    """Candidate rows → Langevin on z (gradients on, the UNet frozen) → G(z) as uint8 → SAMPLE rows
    (+ LATENT rows of the final z). Never compiled: the backward pass goes through the UNet. Two
    batches in flight (one guides while the other is emitted); a batch whose backward pass does not
    fit in GPU memory runs in pieces (``ModelStage.fitting``): each sample's chain is its own."""

    concurrent_batches = 2

    def __init__(self, source: ModelConfig, guide: GuideConfig, clip: ClipConfig, sampler: SamplerConfig,
                 output: OutputConfig, size: int, dtype: str = "auto", compile: str = "off"):
        super().__init__(output)
        self.source_cfg, self.guide, self.sampler = source, guide, sampler
        # runtime.dtype auto means float16 on a GPU, which suits inference but not this backward pass: the
        # per-pixel gradient of an energy averaged over the image (~1/(H·W)) falls below float16's normal
        # range (6e-5) and flushes to zero or loses its digits as it goes back through K UNet calls
        # (mixed-precision training needs loss scaling for the same reason, Micikevicius et al. 2018). So
        # auto is float32 here; an explicit float16 / bfloat16 (float32's range) is the user's to choose.
        self.source = load_model(source, "float32" if dtype == "auto" else dtype, sampler.clip_x0, key="source")
        self.shape = self.source.model_space_shape((3, size, size))
        self.energy = make_energy(guide, lambda: load_clip_section(clip, self.source.device))
        self.ready()

    def prepare(self, batch: dict) -> Work:
        idx = self.samples(batch)
        return Work(idx, [sample_seed(self.sampler.seed, str(batch["key"][i])) for i in idx], None)

    def compute(self, work: Work):
        if not len(work.idx):
            return None
        parts = self.fitting(lambda lo, hi: self._guide(work.seeds[lo:hi]), len(work.seeds))
        z = Latent.cat([p[1] for p in parts])
        scores = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        return np.concatenate([p[0] for p in parts]), LatentMaps.of(z, self.output), scores, z.timesteps

    def _guide(self, seeds: list[int]) -> tuple[np.ndarray, Latent, np.ndarray | None]:
        """Guided images (uint8, host), their final z, and their CLIP scores (with the CLIP energy)."""
        den, g = self.source, self.guide
        # method ddim (eta 0): z = x_T, G the deterministic walk; dpm: z = (x_T, ε…), G the stochastic one
        eta = self.sampler.eta if self.sampler.method == "dpm" else 0.0
        z0 = initial_latent(den, self.shape, steps=self.sampler.steps, eta=eta, seeds=seeds,
                            condition=self.source_cfg.condition)
        chain = den.schedule.grid(g.chain_steps) if g.chain_steps else None  # custom_steps_train

        def energy(x0, keys):  # E on the decoded G(z), clamped to [-1, 1] as written or not (guide.clamp)
            x = den.to_pixels_with_grad(x0)
            return self.energy(x.clamp(-1, 1) if g.clamp else x, keys)

        with torch.enable_grad():  # the Langevin gradient (grad mode is per thread); nothing else builds a graph
            res = guide(den, z0, energy, steps=g.langevin_steps, step_size=g.step_size, weight=g.weight,
                        seeds=seeds, condition=self.source_cfg.condition,
                        guidance_scale=self.source_cfg.guidance_scale, checkpoint=g.checkpoint,
                        chain_timesteps=chain)
        with torch.no_grad():
            pixels = den.to_pixels(res.x0)
            scores = self.energy.similarity(pixels) if isinstance(self.energy, ClipEnergy) else None
        first, last = res.energy[0], res.energy[-1]
        log.info("guide: %d samples, energy %.4f → %.4f (mean over the batch) in %d Langevin steps",
                 len(seeds), float(first.mean()), float(last.mean()), g.langevin_steps)
        return (to_uint8_tensor(pixels).cpu().numpy(), res.z,
                None if scores is None else scores.float().cpu().numpy())

    def emit(self, batch: dict, work: Work, result) -> dict:
        rows = RowBuffer()
        if result is None:
            return rows.batch()
        images, maps, scores, timesteps = result
        idx = work.idx
        n_lat = self.add_latent_rows(rows, maps, batch, idx)
        per_row = {"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                   "seed": np.asarray(work.seeds, dtype=np.int64), "pixels": list(images)}
        if scores is not None:  # CLIP score of the output against guide.text, unaugmented
            per_row["clip_score"] = scores
        rows.extend(per_row, kind=RowKind.SAMPLE, timesteps=timesteps, latent_rows=n_lat)
        return rows.batch()
