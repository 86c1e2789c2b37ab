"""OOD stages (actor pools): invert images and emit mergeable partial fits; decode sampled latents."""

from __future__ import annotations

from dataclasses import dataclass

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
from pipeline.stages.base import LatentMaps, ModelStage, Work, load_model
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


@dataclass
class Inverted:
    """What the invert stage's ``compute`` hands back, on the host: the batch's moments, its latents
    that entered the actor's reservoir, the latent shape, and the latent maps ``output.latents`` asks."""

    fit: MomentFit
    entrants: Reservoir
    shape: tuple
    latents: LatentMaps | None


class InvertAndFitStage(ModelStage):
    """Images → DDIM latents at t0 → rows for the writer (inverted latents if output.latents asks,
    rejects) and one PARTIAL row per batch for the driver: the batch's moments, and those of its
    latents that entered this actor's own bottom-k reservoir.

    Every latent of the final reservoir enters its actor's reservoir when it arrives, so the
    driver's merge is exact; and it receives about k·(1 + ln(n/k)) latents from an actor that
    inverts n images (reservoir k), not n. Batches smaller than k still send all their latents
    until the actor's reservoir is full. The reservoir is updated in ``compute``, under the device
    lock, so two batches in flight never race on it.
    """

    concurrent_batches = 2

    def __init__(self, source: ModelConfig, ood: OODConfig, output: OutputConfig, clip_x0: str = "auto",
                 dtype: str = "auto", compile: str = "off"):
        super().__init__(output)
        self.source_cfg, self.ood = source, ood
        self.source = load_model(source, dtype, clip_x0, compile, key="source")
        self.grid = ood_grid(self.source.schedule, ood.t0, ood.inversion_steps)
        self.reservoir = Reservoir(ood.reservoir)  # this actor's, across its batches
        self.ready()

    def prepare(self, batch: dict) -> tuple[Work, list[str]]:
        """Pixels stacked (and pinned), and each sample's reservoir key (shard/key)."""
        work = self.image_work(batch, 0, self.source)  # DDIM inversion draws no noise: seeds unused
        return work, [f"{batch['shard'][i]}/{batch['key'][i]}" for i in work.idx]

    def compute(self, prepared: tuple[Work, list[str]]) -> Inverted | None:
        work, keys = prepared
        if work.pixels is None:
            return None
        n = len(work.idx)
        pixels = to_model_range(work.pixels.to(self.source.device, non_blocking=True))
        z = Latent.cat(self.fitting(lambda lo, hi: ddim_invert_model_space(
            self.source, self.source.to_model_space(pixels[lo:hi]), timesteps=self.grid,
            condition=self.source_cfg.condition, guidance_scale=self.source_cfg.guidance_scale), len(pixels)))
        z = z[:n] if len(z) > n else z
        z.seeds = [0] * n
        flat = z.x_start.reshape(n, -1)
        fit = MomentFit.of(flat)  # float64, on the device
        fit = MomentFit(fit.count, fit.mean.cpu(), fit.m2.cpu())
        return Inverted(fit, self._entrants(flat, keys), tuple(z.x_start.shape[1:]), LatentMaps.of(z, self.output))

    def emit(self, batch: dict, prepared: tuple[Work, list[str]], result: Inverted | None) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        payload = b""
        if result is not None:
            idx = prepared[0].idx
            payload = partial_to_bytes(result.fit, result.entrants, result.shape, self.grid)
            n_lat = self.add_latent_rows(rows, result.latents, batch, idx)
            rows.extend({"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx]},
                        kind=RowKind.SAMPLE, timesteps=self.grid, latent_rows=n_lat)
        rows.add(kind=RowKind.PARTIAL, partial=payload)
        return rows.batch()

    def _entrants(self, flat: torch.Tensor, keys: list[str]) -> Reservoir:
        offered = Reservoir(self.ood.reservoir).offer(flat, keys)
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
    (never shipped) → DDIM decode. The candidates are host work (float64 draws, slerp, optional
    gradient steps): ``prepare`` makes them while the device decodes the batch before."""

    concurrent_batches = 2

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
        self.source = load_model(source, dtype, clip_x0, compile, key="source")
        self.ready()

    def prepare(self, batch: dict) -> Latent | None:
        """The batch's candidates as a t0 latent on the host (padded for a compiled UNet)."""
        cands = [int(batch["candidate"][i]) for i in self.samples(batch)]
        if not cands:
            return None
        x = candidate_latents(self.stats, self.run_seed, cands, self.settings).float().reshape(len(cands), -1)
        x, seeds = self.padded(self.source, x.numpy(), cands)
        x = torch.from_numpy(x).reshape(len(seeds), *self.shape)
        return Latent(x, x.new_zeros((len(seeds), 0, *self.shape)), self.timesteps, method="ddim", eta=0.0,
                      seeds=seeds)

    def compute(self, z: Latent | None) -> np.ndarray | None:
        if z is None:
            return None
        return to_uint8(torch.cat(self.fitting(lambda lo, hi: self.source.to_pixels(ddim_decode_model_space(
            self.source, z[lo:hi], condition=self.source_cfg.condition,
            guidance_scale=self.source_cfg.guidance_scale)), len(z))))

    def emit(self, batch: dict, z: Latent | None, images: np.ndarray | None) -> dict:
        rows = RowBuffer()
        if z is None:
            return rows.batch()
        idx = self.samples(batch)
        z, cands = z[: len(idx)], np.asarray(z.seeds[: len(idx)], dtype=np.int64)
        n_lat = self.add_latent_rows(rows, z, batch, idx)
        rows.extend({"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                     "pixels": list(images[: len(idx)]), "seed": cands, "candidate": cands},
                    kind=RowKind.SAMPLE, timesteps=self.timesteps, latent_rows=n_lat)
        return rows.batch()
