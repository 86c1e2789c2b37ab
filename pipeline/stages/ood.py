"""OOD stages (actor pools): invert images and emit mergeable partial fits; decode sampled latents."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline.diffusion import Latent, ddim_decode_model_space, ddim_invert_model_space
from pipeline.diffusion.ood import MomentFit, Reservoir, draw_candidates, ood_grid
from pipeline.stages.model import _Rows, _Stage, load_model
from pipeline.stages.tensors import to_model_range, to_uint8


class InvertAndFitStage(_Stage):
    """Images → DDIM latents at t0 → one partial fit per batch (moments + reservoir offer).

    Only these partials leave the actor: the latents themselves never gather on one node.
    """

    def __init__(self, config: dict, config_hash: str):
        super().__init__(config, config_hash)
        self.source = load_model(self.cfg.source, self.cfg.runtime.dtype)
        self.grid = ood_grid(self.source.schedule, self.cfg.ood.t0, self.cfg.ood.inversion_steps)

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        idx = np.flatnonzero(ok)
        out = {"count": [0], "mean": [b""], "m2": [b""], "res_pri": ["[]"], "res_lat": [b""], "shape": [""],
               "timesteps": [json.dumps(self.grid)], "rejected": [int((~ok).sum())],
               "reject_reasons": [json.dumps([f"{batch['shard'][i]}/{batch['key'][i]}: {batch['error'][i]}"
                                              for i in np.flatnonzero(~ok)][:20])]}
        if len(idx):
            x0 = self.source.to_model_space(to_model_range(batch["pixels"][idx]))
            z = ddim_invert_model_space(self.source, x0, timesteps=self.grid, condition=self.cfg.source.condition,
                                        guidance_scale=self.cfg.source.guidance_scale)
            flat = z.x_start.reshape(len(idx), -1)
            fit = MomentFit.of(flat)
            keys = [f"{batch['shard'][i]}/{batch['key'][i]}" for i in idx]
            res = Reservoir(self.cfg.ood.reservoir).offer(flat, keys)
            out.update(count=[fit.count], mean=[fit.mean.numpy().tobytes()], m2=[fit.m2.numpy().tobytes()],
                       res_pri=[json.dumps(res.priorities)], res_lat=[res.latents.numpy().tobytes()],
                       shape=[",".join(map(str, z.x_start.shape[1:]))])
        return {k: np.array(v, dtype=object if k not in ("count", "rejected") else np.int64) for k, v in out.items()}


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


def partial_from_row(row: dict, capacity: int) -> tuple[MomentFit, Reservoir, tuple]:
    """Rebuild a partial fit (and reservoir offer) from one InvertAndFitStage row."""
    if int(row["count"]) == 0:
        return MomentFit(), Reservoir(capacity), ()
    mean = torch.from_numpy(np.frombuffer(row["mean"], np.float64).copy())
    m2 = torch.from_numpy(np.frombuffer(row["m2"], np.float64).copy())
    pri = json.loads(row["res_pri"])
    lat = torch.from_numpy(np.frombuffer(row["res_lat"], np.float32).copy()).reshape(len(pri), -1)
    shape = tuple(int(v) for v in str(row["shape"]).split(","))
    return MomentFit(int(row["count"]), mean, m2), Reservoir(capacity, pri, lat), shape
