"""What every model stage shares: loading models once per actor, and typed rows out.

A model stage is a Ray Data callable class run on an actor pool. It takes the config sections
it needs (never the whole job config), loads its models in ``__init__`` (once per actor), and
turns one numpy batch of rows (``pipeline.data.rows``) into another.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import ModelConfig, OutputConfig
from pipeline.data.model_store import resolve_model
from pipeline.data.rows import RowBuffer, RowKind, rows_of
from pipeline.diffusion import Denoiser, Latent, load_denoiser


def load_model(section: ModelConfig, dtype: str, clip_x0: str = "auto") -> Denoiser:
    """A model section → a Denoiser on this actor's device (the source resolved by data/), its
    x̂0 clipping as ``sampler.clip_x0`` says."""
    folder = resolve_model(section.model, section.storage_options, allow_pickle=section.allow_pickle)
    den = load_denoiser(folder, dtype=dtype, null_class=section.null_class)
    den.schedule = den.schedule.with_x0_clip(clip_x0)
    return den


class ModelStage:
    """Base of the actor-pool stages: rejects pass through, latents leave as LATENT rows."""

    def __init__(self, output: OutputConfig | None = None):
        self.output = output or OutputConfig()

    @staticmethod
    def samples(batch: dict) -> np.ndarray:
        """Indices of the rows to work on (the SAMPLE rows)."""
        return rows_of(batch, RowKind.SAMPLE)

    @staticmethod
    def pass_rejects(rows: RowBuffer, batch: dict) -> None:
        for i in rows_of(batch, RowKind.REJECT):
            rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                     kind=RowKind.REJECT, error=str(batch["error"][i]))

    def add_latent_rows(self, rows: RowBuffer, z: Latent, batch: dict, idx: np.ndarray) -> int:
        """One LATENT row per (sample, map), as ``output.latents`` asks; returns rows per sample."""
        mode = self.output.latents
        if mode == "none":
            return 0
        dtype = np.float16 if self.output.latent_dtype == "float16" else np.float32
        flat, shape = z.to_rows(dtype=dtype, start_only=(mode == "start"))
        maps = flat.reshape(len(z), *shape)
        for b, i in enumerate(idx):
            for step in range(shape[0]):
                rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                         kind=RowKind.LATENT, latent=maps[b, step], step=step, timesteps=z.timesteps,
                         seed=z.seeds[b] if z.seeds else 0)
        return shape[0]
