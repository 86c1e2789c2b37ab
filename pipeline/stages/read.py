"""Read stage: one input shard (or latent file) → one row per sample, rejects included.

Each reader tells the shard ledger how many rows the shard has, which is what lets the driver
commit the shard once they are all staged.
"""

from __future__ import annotations

import io

from pipeline.data.filesystems import get_bytes, url_to_fs
from pipeline.data.ledger import ShardLedger
from pipeline.data.rows import INPUT_COLUMNS, LATENT_INPUT_COLUMNS, RowBuffer, RowKind
from pipeline.data.shards import image_member, iter_tar_samples


def _listing(rows: RowBuffer) -> list[dict]:
    """flat_map wants a list of row dicts."""
    batch = rows.batch()
    return [{c: batch[c][i] for c in rows.columns} for i in range(len(rows))]


def read_shard(item: dict, storage_options: dict, ledger: ShardLedger) -> list[dict]:
    """All samples of one tar shard, in order. Damage becomes reject rows, never an exception.

    The shard is fetched whole (with retries) before parsing, so a transient storage fault
    is retried instead of being mistaken for a truncated tar.
    """
    shard, uri = item["name"], item["uri"]
    rows = RowBuffer(INPUT_COLUMNS)

    def reject(key: str, error: str) -> None:
        rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.REJECT, error=error[:500])

    fs, path = url_to_fs(uri, storage_options)
    try:
        data = get_bytes(fs, path)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        reject("", f"cannot read shard {uri}: {type(exc).__name__}: {exc}")
        data = None
    seen: set[str] = set()
    last_key = ""
    for sample in iter_tar_samples(io.BytesIO(data)) if data is not None else ():
        if isinstance(sample, Exception):
            after = f" after key {last_key!r}" if last_key else ""
            reject("", f"corrupt or truncated tar{after}: {type(sample).__name__}: {sample}")
            continue
        last_key = sample.key
        if sample.key in seen:
            reject(sample.key, "duplicate key in shard (first occurrence kept)")
            continue
        seen.add(sample.key)
        found = image_member(sample.members)
        if found is None:
            reject(sample.key, f"no image member (has {', '.join(sorted(sample.members))})")
            continue
        ext, image = found
        carried = {e: b for e, b in sample.members.items() if e != ext}
        rows.add(shard=shard, key=sample.key, index=len(rows), kind=RowKind.SAMPLE, image=image,
                 member_names=list(carried), member_data=list(carried.values()))
    ledger.expect(shard, len(rows))
    return _listing(rows)


def read_latent_file(item: dict, storage_options: dict, ledger: ShardLedger) -> list[dict]:
    """One latents Parquet file → one row per sample, carrying its stacked maps as a tensor."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.data.latents import latents_from_table

    shard, uri = item["name"], item["uri"]
    fs, path = url_to_fs(uri, storage_options)
    rows = RowBuffer(LATENT_INPUT_COLUMNS)
    try:
        table = pq.read_table(io.BytesIO(get_bytes(fs, path)))
        for key, z in latents_from_table(table):
            rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.SAMPLE,
                     latent=z.maps.astype(np.float32), timesteps=np.asarray(z.timesteps, np.int32),
                     method=z.method, eta=z.eta, seed=z.seed, source_model=z.model,
                     source_cond=z.cond_json)
    except Exception as exc:  # noqa: BLE001
        rows.add(shard=shard, index=len(rows), kind=RowKind.REJECT,
                 error=f"cannot read latents {uri}: {type(exc).__name__}: {exc}"[:500])
    ledger.expect(shard, len(rows))
    return _listing(rows)
