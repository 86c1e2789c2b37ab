"""Latent Parquet files: one per input shard, one row per (sample, step).

A full DPM latent is 1 + K maps (x_start, then one noise per step); at 256×256 with 100
steps that is ~40 MB in float16 per image — too big for one Arrow row in flight. So each row
holds one map: ``step`` 0 is x_start, step i ≥ 1 is the noise used when leaving
``timesteps[i − 1]``. Columns:

  key string · shard string · model string · method string ("dpm" | "ddim") ·
  timesteps list<int32> · eta float32 · cond string (JSON of the condition) · seed int64 ·
  step int32 · shape list<int32> (C, h, w) · dtype string · latent binary (C·h·w values)

Plain pyarrow reads it: ``np.frombuffer(row["latent"], row["dtype"]).reshape(row["shape"])``;
``read_latents`` does the grouping and yields ``(key, StoredLatent)``: numpy arrays, no torch
(``pipeline.diffusion.Latent.from_rows`` turns one into tensors). zstd-compressed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.filesystems import explain_storage_error, url_to_fs

LATENT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("timesteps", pa.list_(pa.int32())),
        ("eta", pa.float32()),
        ("cond", pa.string()),
        ("seed", pa.int64()),
        ("step", pa.int32()),
        ("shape", pa.list_(pa.int32())),
        ("dtype", pa.string()),
        ("latent", pa.binary()),
    ]
)


def latent_row(*, key: str, shard: str, model: str, method: str, timesteps: list[int], eta: float, cond, seed: int,
               step: int, shape, dtype: str, latent: bytes) -> dict:
    """One Parquet row: one map (C, h, w) of one sample's latent, in LATENT_SCHEMA's columns."""
    return {"key": key, "shard": shard, "model": model, "method": method, "timesteps": [int(t) for t in timesteps],
            "eta": float(eta), "cond": json.dumps(cond), "seed": int(seed), "step": int(step),
            "shape": [int(v) for v in shape], "dtype": str(dtype), "latent": latent}


def latent_records(key: str, shard: str, stacked: np.ndarray, *, model: str, method: str, timesteps: list[int],
                   eta: float, cond, seed: int) -> list[dict]:
    """Rows for one sample from its stacked latent (1 + K, C, h, w) in the storage dtype."""
    return [latent_row(key=key, shard=shard, model=model, method=method, timesteps=timesteps, eta=eta, cond=cond,
                       seed=seed, step=i, shape=m.shape, dtype=stacked.dtype, latent=np.ascontiguousarray(m).tobytes())
            for i, m in enumerate(stacked)]


def write_latents(records: list[dict], fs, path: str) -> int:
    """Write rows to one zstd Parquet file at ``path`` on ``fs``; returns bytes written."""
    table = pa.Table.from_pylist(records, schema=LATENT_SCHEMA)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd", row_group_size=1024)
    return int(fs.size(path))


def latent_files(uri: str, storage_options: dict | None):
    """(fs, Parquet paths) under a file, a latents/ folder, or a run's output (its latents/ only)."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        if path.endswith(".parquet"):
            return fs, [path]
        base = path.rstrip("/")
        files = sorted(p for p in fs.find(base) if p.endswith(".parquet"))
        latents_dir = [p for p in files if "/latents/" in p[len(base):] or p[len(base):].startswith("/latents/")]
        return fs, latents_dir or files  # an encode run's output, or its latents/ folder
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None


@dataclass
class StoredLatent:
    """One sample's latent as stored: its maps (x_start, then one noise per step) and settings."""

    maps: np.ndarray  # (1 + K, C, h, w) in the stored dtype; K = 0 for ddim or ``latents: start``
    timesteps: list[int]
    method: str
    eta: float
    seed: int
    model: str
    cond_json: str  # the condition (class index, prompt or null) as the file stores it: JSON text

    @property
    def cond(self):
        return json.loads(self.cond_json)

    @property
    def x_start(self) -> np.ndarray:
        return self.maps[0]

    @property
    def noise(self) -> np.ndarray:
        return self.maps[1:]


def read_latents(uri: str, storage_options: dict | None = None) -> Iterator[tuple[str, StoredLatent]]:
    """Yield (key, StoredLatent) for every sample under ``uri`` (a file, a latents/ folder, or a run's output)."""
    fs, files = latent_files(uri, storage_options)
    for path in files:
        yield from latents_from_table(pq.read_table(fs.open(path, "rb")))


def latents_from_table(table: pa.Table) -> Iterator[tuple[str, StoredLatent]]:
    """Group a latent table's rows by key (in file order), each sample's maps in step order."""
    cols = table.to_pydict()
    order: dict[str, list[int]] = {}
    for i, key in enumerate(cols["key"]):
        order.setdefault(key, []).append(i)
    for key, rows in order.items():
        rows.sort(key=lambda i: cols["step"][i])
        maps = np.stack([np.frombuffer(cols["latent"][i], dtype=cols["dtype"][i]).reshape(cols["shape"][i]) for i in rows])
        first = rows[0]
        yield key, StoredLatent(maps, [int(t) for t in cols["timesteps"][first]], cols["method"][first],
                                float(cols["eta"][first]), int(cols["seed"][first]), cols["model"][first],
                                cols["cond"][first])
