"""Model stage (actor pool): models load once per actor; batches are tensors.

``TranslateStage`` encodes with the source model and decodes with the target (CycleDiffusion),
``EncodeStage`` only encodes, ``DecodeStage`` decodes stored latents with the target.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import numpy as np
import torch

from pipeline.config import JobConfig, ModelConfig
from pipeline.diffusion import (
    Latent,
    ddim_decode,
    ddim_invert,
    dpm_decode,
    dpm_encode,
    load_denoiser,
    sample_seed,
)
from pipeline.metrics.quality import psnr, ssim
from pipeline.stages.tensors import to_model_range, to_uint8

OUT_COLUMNS = ("shard", "key", "index", "step", "error", "extras", "payload", "shape", "info")


def load_model(section: ModelConfig, runtime_dtype: str):
    return load_denoiser(
        section.model,
        storage_options=section.storage_options,
        allow_pickle=section.allow_pickle,
        dtype=runtime_dtype,
        null_class=section.null_class,
    )


def decode_with_target(target, z: Latent, cfg: JobConfig) -> torch.Tensor:
    """Decode a dpm or ddim latent with the target model, condition and guidance of ``cfg``."""
    t = cfg.target
    if z.method == "dpm":
        return dpm_decode(target, z, condition=t.condition, guidance_scale=t.guidance_scale,
                          refine_steps=cfg.sampler.refine_steps)
    return ddim_decode(target, z, condition=t.condition, guidance_scale=t.guidance_scale)


class _Rows:
    """Column lists for the stage's output batch."""

    def __init__(self):
        self.cols = {c: [] for c in OUT_COLUMNS}

    DEFAULTS = {"index": -1, "step": -1, "payload": b""}

    def add(self, **row):
        for c in OUT_COLUMNS:
            self.cols[c].append(row.get(c, self.DEFAULTS.get(c, "")))

    def batch(self) -> dict:
        out = {c: np.array(v, dtype=object) for c, v in self.cols.items()}
        out["index"] = np.array(self.cols["index"], dtype=np.int64)
        out["step"] = np.array(self.cols["step"], dtype=np.int32)
        return out


class _Stage:
    def __init__(self, config: dict, config_hash: str):
        self.cfg = JobConfig.model_validate(config)
        self.config_hash = config_hash
        self.version = version("latentshift")

    @staticmethod
    def _valid(batch: dict):
        """(mask of rows without an error, their indices, their shards, their keys)."""
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        idx = np.flatnonzero(ok)
        return ok, idx, [str(batch["shard"][i]) for i in idx], [str(batch["key"][i]) for i in idx]

    def _pass_rejects(self, rows: _Rows, batch: dict, ok: np.ndarray) -> None:
        for i in np.flatnonzero(~ok):
            rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]), step=-1,
                     error=str(batch["error"][i]), extras="")

    def _latent_rows(self, rows: _Rows, z: Latent, shards, keys, indices, model: str, cond) -> int:
        """Append one row per (sample, step); returns rows per sample."""
        mode = self.cfg.output.latents
        if mode == "none":
            return 0
        dtype = np.float16 if self.cfg.output.latent_dtype == "float16" else np.float32
        flat, shape = z.to_rows(dtype=dtype, start_only=(mode == "start"))
        per = flat.reshape(len(z), shape[0], -1)
        info = {"model": model, "method": z.method, "timesteps": z.timesteps, "eta": z.eta, "cond": cond,
                "dtype": np.dtype(dtype).name}
        map_shape = ",".join(map(str, shape[1:]))
        for b in range(len(z)):
            row_info = json.dumps(dict(info, seed=z.seeds[b] if z.seeds else 0))
            for s in range(shape[0]):
                rows.add(shard=shards[b], key=keys[b], index=int(indices[b]), step=s, payload=per[b, s].tobytes(),
                         shape=map_shape, info=row_info)
        return shape[0]

    def _provenance(self, shard, key, seed, z: Latent, **extra) -> dict:
        s = self.cfg.sampler
        return {"source_shard": shard, "key": key, "method": s.method, "steps": s.steps, "eta": s.eta,
                "strength": s.strength, "refine_steps": s.refine_steps, "seed": s.seed, "sample_seed": seed,
                "timesteps": z.timesteps, "config_hash": self.config_hash, "latentshift": self.version, **extra}


class EncodeStage(_Stage):
    """Images → latents with the source model."""

    def __init__(self, config: dict, config_hash: str):
        super().__init__(config, config_hash)
        self.source = load_model(self.cfg.source, self.cfg.runtime.dtype)

    def encode(self, x0: torch.Tensor, seeds: list[int]) -> Latent:
        s, src = self.cfg.sampler, self.cfg.source
        if s.method == "dpm":
            return dpm_encode(self.source, x0, steps=s.steps, eta=s.eta, strength=s.strength,
                              condition=src.condition, guidance_scale=src.guidance_scale, seeds=seeds)
        z = ddim_invert(self.source, x0, steps=s.steps, strength=s.strength, condition=src.condition,
                        guidance_scale=src.guidance_scale)
        z.seeds = list(seeds)
        return z

    def _inputs(self, batch):
        ok, idx, shards, keys = self._valid(batch)
        seeds = [sample_seed(self.cfg.sampler.seed, f"{sh}/{k}") for sh, k in zip(shards, keys, strict=True)]
        return ok, idx, shards, keys, seeds

    def __call__(self, batch: dict) -> dict:
        rows = _Rows()
        ok, idx, shards, keys, seeds = self._inputs(batch)
        self._pass_rejects(rows, batch, ok)
        if len(idx):
            src_pixels = batch["pixels"][idx]
            z = self.encode(to_model_range(src_pixels), seeds)
            images, per_sample = self.outputs(src_pixels, z)
            n_lat = self._latent_rows(rows, z, shards, keys, batch["index"][idx], self.cfg.source.model,
                                      self.cfg.source.condition)
            for j, i in enumerate(idx):
                info = self._provenance(shards[j], keys[j], seeds[j], z, **self.models_used(), **per_sample[j],
                                        latent_rows=n_lat)
                image = {} if images is None else {"payload": images[j].tobytes(),
                                                   "shape": ",".join(map(str, images[j].shape))}
                rows.add(shard=shards[j], key=keys[j], index=int(batch["index"][i]), step=-1,
                         extras=batch["extras"][i], info=json.dumps(info), **image)
        return rows.batch()

    def outputs(self, src_pixels: np.ndarray, z: Latent) -> tuple[np.ndarray | None, list[dict]]:
        """Images to write (uint8 NHWC) and per-sample provenance; encoding writes latents only."""
        return None, [{} for _ in range(len(z))]

    def models_used(self) -> dict:
        return {"source_model": self.cfg.source.model, "source_condition": self.cfg.source.condition}


class TranslateStage(EncodeStage):
    """Images → source latents → target decode (CycleDiffusion), with PSNR/SSIM against the input."""

    def __init__(self, config: dict, config_hash: str):
        super().__init__(config, config_hash)
        same = self.cfg.target.model == self.cfg.source.model and self.cfg.target.allow_pickle == self.cfg.source.allow_pickle
        self.target = self.source if same else load_model(self.cfg.target, self.cfg.runtime.dtype)

    def decode(self, z: Latent) -> torch.Tensor:
        return decode_with_target(self.target, z, self.cfg)

    def outputs(self, src_pixels: np.ndarray, z: Latent) -> tuple[np.ndarray, list[dict]]:
        out = to_uint8(self.decode(z))
        a = torch.from_numpy(src_pixels).permute(0, 3, 1, 2)
        b = torch.from_numpy(out).permute(0, 3, 1, 2)
        p, q = psnr(a, b).tolist(), ssim(a, b).tolist()
        return out, [{"psnr": _finite(pj), "ssim": qj} for pj, qj in zip(p, q, strict=True)]

    def models_used(self) -> dict:
        t = self.cfg.target
        return {**super().models_used(), "target_model": t.model, "target_condition": t.condition,
                "source_guidance": self.cfg.source.guidance_scale, "target_guidance": t.guidance_scale}


class DecodeStage(_Stage):
    """Stored latents → images with the target model."""

    def __init__(self, config: dict, config_hash: str):
        super().__init__(config, config_hash)
        self.target = load_model(self.cfg.target, self.cfg.runtime.dtype)

    def __call__(self, batch: dict) -> dict:
        rows = _Rows()
        ok = self._valid(batch)[0]
        self._pass_rejects(rows, batch, ok)
        groups: dict[str, list[int]] = {}
        infos = {}
        for i in np.flatnonzero(ok):
            info = json.loads(batch["info"][i])
            infos[i] = info
            groups.setdefault(json.dumps([info["timesteps"], info["method"], info["eta"], batch["shape"][i]]), []).append(i)
        t = self.cfg.target
        for members in groups.values():
            first = infos[members[0]]
            shape = tuple(int(v) for v in str(batch["shape"][members[0]]).split(","))
            flat = np.stack([np.frombuffer(batch["payload"][i], dtype=np.float32) for i in members])
            z = Latent.from_rows(flat, shape, first["timesteps"], method=first["method"], eta=first["eta"],
                                 seeds=[infos[i]["seed"] for i in members])
            try:
                x = decode_with_target(self.target, z, self.cfg)
            except ValueError as exc:  # e.g. a start-only latent, or a latent of another model kind
                for i in members:
                    rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]), step=-1,
                             error=f"cannot decode: {exc}")
                continue
            out = to_uint8(x)
            for j, i in enumerate(members):
                info = dict(infos[i], source_shard=str(batch["shard"][i]), key=str(batch["key"][i]),
                            target_model=t.model, target_condition=t.condition, target_guidance=t.guidance_scale,
                            config_hash=self.config_hash, latentshift=self.version, latent_rows=0)
                rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]), step=-1,
                         payload=out[j].tobytes(), shape=",".join(map(str, out[j].shape)), info=json.dumps(info))
        return rows.batch()


def _finite(v: float):
    return v if np.isfinite(v) else None  # identical images: PSNR is infinite; JSON has no inf
