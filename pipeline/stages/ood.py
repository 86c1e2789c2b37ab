"""OOD stages (actor pools): invert images and emit mergeable partial fits; decode sampled latents."""

from __future__ import annotations

import json

import torch

from pipeline.diffusion import Latent, ddim_decode_model_space, ddim_invert_model_space
from pipeline.diffusion.ood import MomentFit, Reservoir, draw_candidates, ood_grid
from pipeline.stages.model import _Rows, _Stage, load_model
from pipeline.stages.tensors import to_model_range, to_uint8
from pipeline.stages.write import FORWARD_STEP


def partial_to_bytes(fit: MomentFit, res: Reservoir, shape, grid: list[int]) -> bytes:
    """A partial fit as safetensors bytes (never pickle): moments, reservoir, latent shape, grid."""
    if fit.count == 0:
        return b""
    from safetensors.torch import save

    return save({"count": torch.tensor([fit.count], dtype=torch.int64), "mean": fit.mean, "m2": fit.m2,
                 "res_pri": torch.tensor(res.priorities, dtype=torch.float64), "res_lat": res.latents.contiguous(),
                 "shape": torch.tensor(list(shape), dtype=torch.int64),
                 "timesteps": torch.tensor(grid, dtype=torch.int64)})


def partial_from_bytes(data: bytes, capacity: int) -> tuple[MomentFit, Reservoir, tuple, list[int]]:
    if not data:
        return MomentFit(), Reservoir(capacity), (), []
    from safetensors.torch import load

    t = load(bytes(data))
    fit = MomentFit(int(t["count"][0]), t["mean"], t["m2"])
    res = Reservoir(capacity, t["res_pri"].tolist(), t["res_lat"])
    return fit, res, tuple(t["shape"].tolist()), t["timesteps"].tolist()


class InvertAndFitStage(_Stage):
    """Images → DDIM latents at t0 → rows for the writer (inverted latents if output.latents asks,
    rejects) and one partial fit per batch (moments + reservoir offer).

    Only partial fits reach the driver: the latents themselves never gather on one node.
    """

    def __init__(self, config: dict, config_hash: str):
        super().__init__(config, config_hash)
        self.source = load_model(self.cfg.source, self.cfg.runtime.dtype)
        self.grid = ood_grid(self.source.schedule, self.cfg.ood.t0, self.cfg.ood.inversion_steps)

    def __call__(self, batch: dict) -> dict:
        rows = _Rows()
        ok, idx, shards, keys = self._valid(batch)
        self._pass_rejects(rows, batch, ok)
        payload = b""
        if len(idx):
            x0 = self.source.to_model_space(to_model_range(batch["pixels"][idx]))
            z = ddim_invert_model_space(self.source, x0, timesteps=self.grid, condition=self.cfg.source.condition,
                                        guidance_scale=self.cfg.source.guidance_scale)
            z.seeds = [0] * len(idx)
            flat = z.x_start.reshape(len(idx), -1)
            res = Reservoir(self.cfg.ood.reservoir).offer(flat, [f"{s}/{k}" for s, k in zip(shards, keys, strict=True)])
            payload = partial_to_bytes(MomentFit.of(flat), res, z.x_start.shape[1:], self.grid)
            n_lat = self._latent_rows(rows, z, shards, keys, batch["index"][idx], self.cfg.source.model,
                                      self.cfg.source.condition)
            for j, i in enumerate(idx):
                info = {"source_shard": shards[j], "key": keys[j], "method": "ddim", "t0": self.grid[0],
                        "timesteps": self.grid, "source_model": self.cfg.source.model,
                        "config_hash": self.config_hash, "latentshift": self.version, "latent_rows": n_lat}
                rows.add(shard=shards[j], key=keys[j], index=int(batch["index"][i]), step=-1, info=json.dumps(info))
        rows.add(shard="", key="", index=-1, step=FORWARD_STEP, payload=payload)  # the partial fit, for the driver
        return rows.batch()


class SampleDecodeStage(_Stage):
    """Candidate indices → latents μ + σ·n(seed) at t0 (regenerated, never shipped) → DDIM decode."""

    def __init__(self, config: dict, config_hash: str, stats_uri: str, stats_options: dict, acceptance: float):
        super().__init__(config, config_hash)
        from pipeline.data.stats import read_stats

        tensors, self.header = read_stats(stats_uri, stats_options)
        self.mean, self.variance = tensors["mean"], tensors["variance"]
        self.shape = tuple(self.header["shape"])
        self.timesteps = list(self.header["timesteps"])
        self.acceptance = acceptance
        self.stats_uri = stats_uri
        self.source = load_model(self.cfg.source, self.cfg.runtime.dtype)

    def __call__(self, batch: dict) -> dict:
        rows = _Rows()
        cands = [int(c) for c in batch["candidate"]]
        x = draw_candidates(self.mean, self.variance, cands, self.cfg.sampler.seed)
        x = x.float().reshape(len(cands), *self.shape)
        empty = x.new_zeros((len(cands), 0, *self.shape))
        z = Latent(x, empty, self.timesteps, method="ddim", eta=0.0, seeds=cands)
        images = to_uint8(self.source.to_pixels(ddim_decode_model_space(
            self.source, z, condition=self.cfg.source.condition, guidance_scale=self.cfg.source.guidance_scale)))
        shards, keys = [str(s) for s in batch["shard"]], [str(k) for k in batch["key"]]
        n_lat = self._latent_rows(rows, z, shards, keys, batch["index"], self.cfg.source.model, self.cfg.source.condition)
        for j in range(len(cands)):
            info = {"source_shard": shards[j], "key": keys[j], "candidate": cands[j], "seed": self.cfg.sampler.seed,
                    "source_model": self.cfg.source.model, "stats": self.stats_uri, "t0": self.timesteps[0],
                    "timesteps": self.timesteps, "geometric": self.cfg.ood.geometric,
                    "tolerance": self.cfg.ood.tolerance, "acceptance_rate": self.acceptance,
                    "config_hash": self.config_hash, "latentshift": self.version, "latent_rows": n_lat}
            rows.add(shard=shards[j], key=keys[j], index=int(batch["index"][j]), step=-1, extras="",
                     payload=images[j].tobytes(), shape=",".join(map(str, images[j].shape)), info=json.dumps(info))
        return rows.batch()
