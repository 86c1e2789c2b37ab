"""Read stage: one input shard (or latent file) → one row per sample, rejects included."""

from __future__ import annotations

import base64
import io
import json
import posixpath

from pipeline.data.filesystems import get_bytes, url_to_fs
from pipeline.data.outputs import OutputStore
from pipeline.data.shards import image_member, iter_tar_samples

EXPECTED = "expected.json"


def _row(shard, key, index, image=b"", extras="", error=""):
    return {"shard": shard, "key": key, "index": index, "image": image, "extras": extras, "error": error}


def read_shard(item: dict, storage_options: dict, store: OutputStore, run_id: str) -> list[dict]:
    """All samples of one tar shard, in order. Damage becomes reject rows, never an exception.

    The shard is fetched whole (with retries) before parsing, so a transient storage fault
    is retried instead of being mistaken for a truncated tar.
    """
    shard, uri = item["name"], item["uri"]
    rows: list[dict] = []
    fs, path = url_to_fs(uri, storage_options)
    try:
        data = get_bytes(fs, path)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        rows.append(_row(shard, "", 0, error=f"cannot read shard {uri}: {type(exc).__name__}: {exc}"[:500]))
        data = None
    seen: set[str] = set()
    if data is not None:
        for item_ in iter_tar_samples(io.BytesIO(data)):
            i = len(rows)
            if isinstance(item_, Exception):
                after = f" after key {rows[-1]['key']!r}" if rows else ""
                rows.append(_row(shard, "", i, error=f"corrupt or truncated tar{after}: {type(item_).__name__}: {item_}"[:500]))
                continue
            if item_.key in seen:
                rows.append(_row(shard, item_.key, i, error="duplicate key in shard (first occurrence kept)"))
                continue
            seen.add(item_.key)
            found = image_member(item_.members)
            if found is None:
                rows.append(_row(shard, item_.key, i, error=f"no image member (has {', '.join(sorted(item_.members))})"))
                continue
            ext, image = found
            carried = {e: base64.b64encode(b).decode() for e, b in item_.members.items() if e != ext}
            rows.append(_row(shard, item_.key, i, image=image, extras=json.dumps(carried)))
    store.put_json(posixpath.join(store.staging(run_id, shard), EXPECTED), {"rows": len(rows)})
    return rows


def read_latent_file(item: dict, storage_options: dict, store: OutputStore, run_id: str) -> list[dict]:
    """One latents Parquet file → one row per sample: payload = the stacked latent bytes."""
    import pyarrow.parquet as pq

    from pipeline.data.latents import latents_from_table

    shard, uri = item["name"], item["uri"]
    fs, path = url_to_fs(uri, storage_options)
    rows: list[dict] = []
    try:
        table = pq.read_table(io.BytesIO(get_bytes(fs, path)))
        for i, (key, z) in enumerate(latents_from_table(table)):
            stacked, shape = z.to_rows(dtype="float32")
            info = {"timesteps": z.timesteps, "method": z.method, "eta": z.eta, "seed": z.seeds[0],
                    "source_model": table["model"][0].as_py(), "source_condition": json.loads(table["cond"][0].as_py())}
            rows.append({"shard": shard, "key": key, "index": i, "step": -1, "error": "", "extras": "",
                         "payload": stacked.tobytes(), "shape": ",".join(map(str, shape)), "info": json.dumps(info)})
    except Exception as exc:  # noqa: BLE001
        rows.append({"shard": shard, "key": "", "index": len(rows), "step": -1, "extras": "", "payload": b"",
                     "shape": "", "info": "", "error": f"cannot read latents {uri}: {type(exc).__name__}: {exc}"[:500]})
    store.put_json(posixpath.join(store.staging(run_id, shard), EXPECTED), {"rows": len(rows)})
    return rows
