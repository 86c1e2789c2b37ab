"""OOD stages (actor pools): invert images and emit mergeable partial fits; decode sampled latents."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ModelConfig, OODConfig, OutputConfig
from pipeline.data.rows import RowBuffer, RowKind
from pipeline.diffusion import Latent, ddim_decode_model_space, ddim_invert_model_space
from pipeline.diffusion.ood import (
    CandidateSettings,
    GeometryWindow,
    MomentFit,
    OODStats,
    Reservoir,
    calibrate_window,
    candidate_latents,
    ood_grid,
)
from pipeline.stages.base import ModelStage, load_model
from pipeline.stages.tensors import to_model_range, to_uint8


def partial_to_bytes(fit: MomentFit, res: Reservoir, shape, grid: list[int]) -> bytes:
    """A partial fit as safetensors bytes (never pickle): moments, reservoir, latent shape, grid."""
    if fit.count == 0:
        return b""
    from safetensors.torch import save

    latents = res.latents if res.latents is not None else torch.zeros((0, fit.mean.numel()))
    return save({"count": torch.tensor([fit.count], dtype=torch.int64), "mean": fit.mean, "m2": fit.m2,
                 "res_pri": torch.tensor(res.priorities, dtype=torch.float64), "res_lat": latents.contiguous(),
                 "shape": torch.tensor(list(shape), dtype=torch.int64),
                 "timesteps": torch.tensor(grid, dtype=torch.int64)})


def partial_from_bytes(data: bytes, capacity: int) -> tuple[MomentFit, Reservoir, tuple, list[int]]:
    if not data:
        return MomentFit(), Reservoir(capacity), (), []
    from safetensors.torch import load

    t = load(bytes(data))
    fit = MomentFit(int(t["count"][0]), t["mean"], t["m2"])
    res = Reservoir(capacity, t["res_pri"].tolist(), t["res_lat"] if len(t["res_pri"]) else None)
    return fit, res, tuple(t["shape"].tolist()), t["timesteps"].tolist()


class InvertAndFitStage(ModelStage):
    """Images → DDIM latents at t0 → rows for the writer (inverted latents if output.latents asks,
    rejects) and one PARTIAL row per batch for the driver: the batch's moments, and those of its
    latents that entered this actor's own bottom-k reservoir.

    Every latent of the final reservoir enters its actor's reservoir when it arrives, so the
    driver's merge is exact; and it receives about k·(1 + ln(n/k)) latents from an actor that
    inverts n images (reservoir k), not n. Batches smaller than k still send all their latents
    until the actor's reservoir is full.
    """

    def __init__(self, source: ModelConfig, ood: OODConfig, output: OutputConfig, clip_x0: str = "auto",
                 dtype: str = "auto", compile: str = "off"):
        super().__init__(output)
        self.source_cfg, self.ood = source, ood
        self.source = load_model(source, dtype, clip_x0, compile)
        self.grid = ood_grid(self.source.schedule, ood.t0, ood.inversion_steps)
        self.reservoir = Reservoir(ood.reservoir)  # this actor's, across its batches
        self.ready()

    def __call__(self, batch: dict) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        idx = self.samples(batch)
        payload = b""
        if len(idx):
            x0 = self.source.to_model_space(to_model_range(np.stack(batch["pixels"][idx])))
            z = ddim_invert_model_space(self.source, x0, timesteps=self.grid, condition=self.source_cfg.condition,
                                        guidance_scale=self.source_cfg.guidance_scale)
            z.seeds = [0] * len(idx)
            flat = z.x_start.reshape(len(idx), -1)
            payload = partial_to_bytes(MomentFit.of(flat), self._entrants(flat, batch, idx), z.x_start.shape[1:],
                                       self.grid)
            n_lat = self.add_latent_rows(rows, z, batch, idx)
            for i in idx:
                rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                         kind=RowKind.SAMPLE, timesteps=self.grid, latent_rows=n_lat)
        rows.add(kind=RowKind.PARTIAL, partial=payload)
        return rows.batch()

    def _entrants(self, flat: torch.Tensor, batch: dict, idx: np.ndarray) -> Reservoir:
        offered = Reservoir(self.ood.reservoir).offer(flat, [f"{batch['shard'][i]}/{batch['key'][i]}" for i in idx])
        self.reservoir = self.reservoir.merge(offered)
        kept = set(self.reservoir.priorities)
        take = [j for j, p in enumerate(offered.priorities) if p in kept]
        return Reservoir(self.ood.reservoir, [offered.priorities[j] for j in take],
                         offered.latents[take] if take else None)


def ood_stats(tensors: dict, header: dict) -> OODStats:
    """A stats file's contents (``pipeline.data.stats.read_stats``) as the candidates need them."""
    reference = tensors.get("reference")
    return OODStats(mean=torch.tensor(tensors["mean"]), variance=torch.tensor(tensors["variance"]),
                    reference=None if reference is None else torch.tensor(reference).double(),
                    geometry=header.get("geometry"))


def candidate_settings(ood: OODConfig, stats: OODStats) -> CandidateSettings:
    """The ``ood`` section as candidate settings; a calibrated window is measured here, once."""
    window = GeometryWindow()
    if ood.geometric and ood.selection == "window" and ood.window == "calibrated":
        window = calibrate_window(stats.reference, stats.geometry, coverage=ood.window_coverage)
    return CandidateSettings(mode=ood.candidates, weight=ood.slerp_weight,
                             selection=ood.selection if ood.geometric else "none", tolerance=ood.tolerance,
                             window=window, optimise_steps=ood.optimise_steps, optimise_lr=ood.optimise_lr)


class SampleDecodeStage(ModelStage):
    """Candidate indices → their latents at t0, regenerated from (stats, run seed, index, settings)
    (never shipped) → DDIM decode."""

    def __init__(self, source: ModelConfig, output: OutputConfig, run_seed: int, stats_uri: str,
                 stats_options: dict, candidates: dict | None = None, clip_x0: str = "auto", dtype: str = "auto",
                 compile: str = "off"):
        super().__init__(output)
        from pipeline.data.stats import read_stats

        tensors, header = read_stats(stats_uri, stats_options)
        self.stats = ood_stats(tensors, header)
        self.settings = CandidateSettings.from_dict(candidates or {})
        self.shape = tuple(header["shape"])
        self.timesteps = list(header["timesteps"])
        self.source_cfg, self.run_seed = source, run_seed
        self.source = load_model(source, dtype, clip_x0, compile)
        self.ready()

    def __call__(self, batch: dict) -> dict:
        rows = RowBuffer()
        idx = self.samples(batch)
        cands = [int(batch["candidate"][i]) for i in idx]
        x = candidate_latents(self.stats, self.run_seed, cands, self.settings).float().reshape(len(cands), *self.shape)
        z = Latent(x, x.new_zeros((len(cands), 0, *self.shape)), self.timesteps, method="ddim", eta=0.0, seeds=cands)
        images = to_uint8(self.source.to_pixels(ddim_decode_model_space(
            self.source, z, condition=self.source_cfg.condition, guidance_scale=self.source_cfg.guidance_scale)))
        n_lat = self.add_latent_rows(rows, z, batch, idx)
        for j, i in enumerate(idx):
            rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]), kind=RowKind.SAMPLE,
                     pixels=images[j], timesteps=self.timesteps, seed=cands[j], candidate=cands[j], latent_rows=n_lat)
        return rows.batch()
