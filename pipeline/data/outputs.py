"""The output layout of a run, and the commit that makes a shard's outputs visible at once.

  images/<shard>.tar         translated samples (same keys as the input shard)
  latents/<shard>.parquet    latents, one row per (sample, step)
  _rejects/<shard>.jsonl     samples that could not be used, with the reason
  _ledger/<shard>.json       the commit record: written last, so its presence means done
  _ledger/runs/<run>.json    one summary per run
  _staging/<run>/<shard>/    parts written by workers, merged by the commit, then removed

A shard is committed by merging its staged parts into the final files (each a single
atomic write), then writing its ledger record. A run skips shards that have a record; a
killed run leaves only staging behind, which the next run clears and redoes.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from dataclasses import dataclass

from pipeline.data.filesystems import get_bytes, put_bytes, url_to_fs, with_retries


@dataclass
class OutputStore:
    uri: str
    storage_options: dict

    def __post_init__(self):
        self.fs, root = url_to_fs(self.uri, self.storage_options)
        self.root = root.rstrip("/")

    def __reduce__(self):  # ship to Ray workers as (uri, options), not a live filesystem
        return (OutputStore, (self.uri, self.storage_options))

    # paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def images(self, shard: str) -> str:
        return self.path("images", f"{shard}.tar")

    def latents(self, shard: str) -> str:
        return self.path("latents", f"{shard}.parquet")

    def rejects(self, shard: str) -> str:
        return self.path("_rejects", f"{shard}.jsonl")

    def ledger(self, shard: str) -> str:
        return self.path("_ledger", f"{shard}.json")

    def staging(self, run_id: str, shard: str = "") -> str:
        return self.path("_staging", run_id, shard) if shard else self.path("_staging", run_id)

    # io
    def put(self, path: str, data: bytes) -> None:
        put_bytes(self.fs, path, data)

    def get(self, path: str) -> bytes:
        return get_bytes(self.fs, path)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)  # s3fs answers from a cached listing of the parent otherwise
        return bool(with_retries(self.fs.exists, path))

    def put_json(self, path: str, obj) -> None:
        self.put(path, json.dumps(obj, sort_keys=True, indent=1, default=str).encode())

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def listdir(self, path: str) -> list[str]:
        try:
            return [p if isinstance(p, str) else p["name"] for p in with_retries(self.fs.ls, path, detail=False)]
        except FileNotFoundError:
            return []

    def remove_tree(self, path: str) -> None:
        try:
            with_retries(self.fs.rm, path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    # ledger
    def committed(self) -> set[str]:
        """Names of shards that have a ledger record."""
        self.fs.invalidate_cache()
        names = set()
        for p in self.listdir(self.path("_ledger")):
            base = posixpath.basename(p.rstrip("/"))
            if base.endswith(".json"):
                names.add(base[: -len(".json")])
        return names

    def probe_writable(self) -> None:
        """Write and remove a small object under _ledger/ (fails fast on a bad bucket or credentials)."""
        probe = self.path("_ledger", f".probe-{time.time_ns()}")
        self.put(probe, b"ok")
        try:
            self.fs.rm(probe)
        except FileNotFoundError:
            pass


def merge_parts(store: OutputStore, run_id: str, shard: str, parts: list[str]) -> dict:
    """Merge staged parts of one shard into its final outputs; return counts for the ledger.

    Parts may overlap (a retried task writes its batch twice): each sample index is taken
    once, from the first part that has it. Samples are written in input order.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.latents import LATENT_SCHEMA
    from pipeline.data.shards import iter_tar_samples, write_samples

    staging = store.staging(run_id, shard)
    samples: dict[int, tuple[str, dict]] = {}
    rejects: dict[int, dict] = {}
    latent_tables = []
    seen_latent: set[tuple[str, int]] = set()
    for part in sorted(parts):
        manifest = store.get_json(f"{staging}/{part}.json")
        fresh = {int(i) for i in manifest["indices"]} - set(samples) - set(rejects)
        key_index = {k: int(i) for i, k in manifest["keys"]}
        if manifest.get("has_tar"):
            for item in iter_tar_samples(io.BytesIO(store.get(f"{staging}/{part}.tar"))):
                if isinstance(item, Exception):
                    raise RuntimeError(f"staged part {part} of {shard} is damaged: {item}")
                idx = key_index[item.key]
                if idx in fresh:
                    samples[idx] = (item.key, item.members)
        for line in manifest.get("rejects", []):
            if int(line["index"]) in fresh:
                rejects[int(line["index"])] = line
        if manifest.get("has_latents"):
            table = pq.read_table(io.BytesIO(store.get(f"{staging}/{part}.parquet")))
            keep = []
            for i, (k, s) in enumerate(zip(table["key"].to_pylist(), table["step"].to_pylist(), strict=True)):
                if (k, s) not in seen_latent:
                    seen_latent.add((k, s))
                    keep.append(i)
            latent_tables.append((table.take(keep), key_index))

    out = {"images": 0, "rejected": len(rejects), "bytes_images": 0, "bytes_latents": 0}
    if samples:
        buf = io.BytesIO()
        out["images"] = write_samples(buf, (samples[i] for i in sorted(samples)))
        store.put(store.images(shard), buf.getvalue())
        out["bytes_images"] = buf.tell()
    if latent_tables:
        order = {}
        for _, key_index in latent_tables:
            order.update(key_index)
        table = pa.concat_tables([t for t, _ in latent_tables]).cast(LATENT_SCHEMA)
        rank = [(order.get(k, 1 << 62), s) for k, s in zip(table["key"].to_pylist(), table["step"].to_pylist(), strict=True)]
        table = table.take(sorted(range(len(rank)), key=rank.__getitem__))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=256)
        store.put(store.latents(shard), buf.getvalue())
        out["bytes_latents"] = buf.tell()
        out["latent_samples"] = len({k for k in table["key"].to_pylist()})
    if rejects:
        body = "".join(json.dumps(rejects[i], sort_keys=True) + "\n" for i in sorted(rejects))
        store.put(store.rejects(shard), body.encode())
    return out
