"""Score Parquet files: one per shard, ``scores/<shard>.parquet``, one row per (sample, rank).

Written by `latentshift score` (scores of an existing output), by translate with ``score.inline``,
and by the zero-shot search (rank 0 is the output image, ranks 1… its runners-up). Columns:

  key string · shard string · rank int32 · candidate int64 (search: the candidate's index, else −1) ·
  clip_score float32 (cos of CLIP image and target text; NaN: not measured) ·
  directional float32 (directional CLIP against the input; NaN: not measured) ·
  trial int32 · skip int32 · strength float32 · encoder_scale float32 · decoder_scale float32
  (search only; null otherwise)

What the scores were measured with travels in the file: its schema metadata ``latentshift`` is the
JSON of the writing run's job, config hash, version and settings (CLIP model and checkpoint, the texts
and templates, the search grid), as each output sample's ``latentshift.json`` has them
(``score_metadata``).

Plain pyarrow, duckdb or polars read it; no Ray, no torch.
"""

from __future__ import annotations

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.filesystems import explain_storage_error, url_to_fs

SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("rank", pa.int32()),
        ("candidate", pa.int64()),
        ("clip_score", pa.float32()),
        ("directional", pa.float32()),
        ("trial", pa.int32()),
        ("skip", pa.int32()),
        ("strength", pa.float32()),
        ("encoder_scale", pa.float32()),
        ("decoder_scale", pa.float32()),
    ]
)
SEARCH_FIELDS = ("trial", "skip", "strength", "encoder_scale", "decoder_scale")
METADATA_KEY = b"latentshift"


def score_row(*, key: str, shard: str, rank: int = 0, candidate: int = -1, clip_score: float = math.nan,
              directional: float = math.nan, choice: dict | None = None) -> dict:
    """One Parquet row; ``choice`` is a search candidate's settings (``rows.search_choice``)."""
    row = {"key": key, "shard": shard, "rank": int(rank), "candidate": int(candidate), "clip_score": float(clip_score),
           "directional": float(directional)}
    row.update({f: (choice or {}).get(f) for f in SEARCH_FIELDS})
    return row


def scores_to_bytes(rows: list[dict], meta: dict | None = None) -> bytes:
    """Rows as one Parquet file; ``meta`` (JSON-able: the run's job and settings) in its schema metadata."""
    schema = SCORE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)}) if meta else SCORE_SCHEMA
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    return buf.getvalue()


def score_metadata(table: pa.Table) -> dict:
    """What a scores table was measured with (``scores_to_bytes``'s ``meta``); {} when it says nothing."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_scores(uri: str, storage_options: dict | None = None) -> pa.Table:
    """Every ``scores/*.parquet`` under an output (or one file) as one table."""
    fs, path = url_to_fs(uri, storage_options or {})
    try:
        files = [path] if path.endswith(".parquet") else sorted(fs.glob(path.rstrip("/") + "/scores/*.parquet"))
        tables = [pq.read_table(f, filesystem=fs) for f in files]
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None
    return pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
