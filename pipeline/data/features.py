"""Feature files of the eval job: one per shard, ``_eval/features/<shard>.parquet``, one row per image.

Columns: ``key`` string · ``features`` fixed-size list of float32 (the feature network's D) · ``psnr``,
``ssim`` float32: the image's PSNR/SSIM to its input as the job that made it recorded them in its
``latentshift.json`` (NaN: none; a PSNR of identical images is recorded as null, read as +inf). Its schema
metadata ``latentshift`` is the JSON of what the features were measured with (the network's file, its
sha256 and architecture, the resize), so a file is never read against another network's.

Plain pyarrow, duckdb or polars read it; no Ray, no torch.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"latentshift"


def schema(dims: int, meta: dict | None = None) -> pa.Schema:
    s = pa.schema([("key", pa.string()), ("features", pa.list_(pa.float32(), dims)), ("psnr", pa.float32()),
                   ("ssim", pa.float32())])
    return s.with_metadata({METADATA_KEY: json.dumps(meta or {}, sort_keys=True).encode()})


def features_table(keys: list[str], vectors: np.ndarray, psnr, ssim, meta: dict | None = None) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), d)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), column, pa.array(np.asarray(psnr, np.float32)),
                                 pa.array(np.asarray(ssim, np.float32))], schema=schema(d, meta))


def table_to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def features_from_table(table: pa.Table) -> dict:
    """A feature table's ``keys``, ``features`` float32 (n, D), ``psnr`` and ``ssim`` float32 (n,), ``meta``."""
    column = table["features"].combine_chunks()
    d = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return {"keys": table["key"].to_pylist(), "features": values.reshape(len(table), d),
            "psnr": table["psnr"].to_numpy().astype(np.float32), "ssim": table["ssim"].to_numpy().astype(np.float32),
            "meta": json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))}


def features_from_bytes(data: bytes) -> dict:
    return features_from_table(pq.read_table(io.BytesIO(data)))
