"""The output layout of a run, and the commit that makes a shard's outputs visible at once.

  images/<shard>.tar         translated samples (same keys as the input shard)
  latents/<shard>.parquet    latents, one row per (sample, step)
  scores/<shard>.parquet     CLIP scores, one row per (sample, rank) (pipeline/data/scores.py)
  _rejects/<shard>.jsonl     samples that could not be used, with the reason
  _ledger/<shard>.json       the commit record: written last, so its presence means done
  _ledger/runs/<run>.json    one summary per run
  _staging/<run>/<shard>/    parts written by workers, merged by the commit, then removed
  _claims/<shard>/<n>.json   which run is doing the shard now (pipeline/data/claims.py)
  _leases/<run>.json         a live run's heartbeat

A job that adds to another job's output (``latentshift score`` adds ``scores/``) keeps its own
ledger, staging, claims, leases and rejects under ``<control>/`` (e.g. ``_score/_ledger/``), so the
two jobs' records of a shard never meet.

How a shard gets there, exactly once, is the ledger's rule (``pipeline/data/ledger.py``);
what each output file holds, and how a shard's parts become it, is its output kind's
(``pipeline/data/output_kinds.py``); this module names the run-control paths and does the storage I/O.

A finished run leaves no empty control folder (``_staging/``, ``_claims/``, ``_leases/``, the
control root): on object storage a folder is a prefix, gone with its last object; on a local disk
the run removes the folders it emptied with ``os.rmdir``, which refuses a folder holding anything
(another run's lease, claim or staging). A writer that loses the race (its folder removed between
making it and writing into it) makes it again and writes (``put``, ``create``), so no file is lost.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass

from pipeline.data.filesystems import (
    create_exclusive,
    get_bytes,
    is_local,
    put_bytes,
    url_to_fs,
    with_retries,
)
from pipeline.data.output_kinds import FEATURES, IMAGES, LATENTS, REJECTS, SCORES

log = logging.getLogger(__name__)

FOLDER_RACE_ATTEMPTS = 5  # a write whose local folder another run removed (it was empty) is tried again


@dataclass
class OutputStore:
    uri: str
    storage_options: dict
    control: str = ""  # folder of the run-control files (ledger, staging, claims, leases, rejects); "" = the root

    def __post_init__(self):
        self.fs, root = url_to_fs(self.uri, self.storage_options)
        self.root = root.rstrip("/")

    def __reduce__(self):  # ship to Ray workers as (uri, options), not a live filesystem
        return (OutputStore, (self.uri, self.storage_options, self.control))

    # paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def ctl(self, *parts: str) -> str:
        """A run-control path: under ``control`` when the job keeps its records apart."""
        return self.path(self.control, *parts) if self.control else self.path(*parts)

    # a shard's outputs: each kind names its own path (pipeline/data/output_kinds.py)
    def images(self, shard: str) -> str:
        return IMAGES.path(self, shard)

    def latents(self, shard: str) -> str:
        return LATENTS.path(self, shard)

    def scores(self, shard: str) -> str:
        return SCORES.path(self, shard)

    def features(self, shard: str) -> str:
        return FEATURES.path(self, shard)

    def rejects(self, shard: str) -> str:
        return REJECTS.path(self, shard)

    def ledger(self, shard: str) -> str:
        return self.ctl("_ledger", f"{shard}.json")

    def staging(self, run_id: str, shard: str = "") -> str:
        return self.ctl("_staging", run_id, shard) if shard else self.ctl("_staging", run_id)

    def claims(self, shard: str = "") -> str:
        return self.ctl("_claims", shard) if shard else self.ctl("_claims")

    def lease(self, run_id: str = "") -> str:
        return self.ctl("_leases", f"{run_id}.json") if run_id else self.ctl("_leases")

    # io
    def put(self, path: str, data: bytes) -> None:
        self._into_folder(put_bytes, path, data)

    def create(self, path: str, data: bytes) -> bool:
        """Write ``path`` only if it does not exist (atomically, against any other writer)."""
        return self._into_folder(create_exclusive, path, data)

    def _into_folder(self, write, path: str, data: bytes):
        """``write(fs, path, data)``, again when another run removed the (empty) local folder between
        ``write`` making it and writing into it (``remove_empty_folder``): it is made anew each time."""
        for attempt in range(FOLDER_RACE_ATTEMPTS):
            try:
                return write(self.fs, path, data)
            except FileNotFoundError:
                if not is_local(self.fs) or attempt == FOLDER_RACE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def remove(self, path: str) -> None:
        try:
            with_retries(self.fs.rm_file, path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(posixpath.dirname(path))

    def find(self, path: str) -> list[str]:
        """Every object under ``path`` (none if it does not exist)."""
        self.fs.invalidate_cache(path)
        try:
            return sorted(with_retries(self.fs.find, path))
        except FileNotFoundError:
            return []

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

    def remove_empty_folder(self, path: str) -> None:
        """Local stores only (object stores have no folders): remove ``path`` if it is empty.
        Safe beside live runs: rmdir(2) refuses a folder with anything in it, and a run writing
        into it at that moment makes it again (``put``, ``create``)."""
        if is_local(self.fs):
            import os

            try:
                os.rmdir(path)
            except OSError:  # not empty (another run's staging), or gone
                pass

    def remove_empty_control_folders(self) -> None:
        """At a run's end: the run-control folders it left empty, deepest first, then the control
        root of a job that keeps its records apart (``_score/``). ``_ledger/`` holds the record of
        every commit and run, and ``_rejects/`` is made only with a file in it."""
        for folder in ("_staging", "_claims", "_leases"):
            self.remove_empty_folder(self.ctl(folder))
        if self.control:
            self.remove_empty_folder(self.ctl())

    # ledger
    def committed(self) -> set[str]:
        """Names of shards that have a ledger record."""
        self.fs.invalidate_cache()
        names = set()
        for p in self.listdir(self.ctl("_ledger")):
            base = posixpath.basename(p.rstrip("/"))
            if base.endswith(".json"):
                names.add(base[: -len(".json")])
        return names

    def probe_writable(self) -> None:
        """Write and remove a small object under _ledger/ (fails fast on a bad bucket or credentials)."""
        probe = self.ctl("_ledger", f".probe-{time.time_ns()}")
        self.create(probe, b"ok")
        if self.create(probe, b"again"):  # e.g. an S3-compatible server without conditional writes
            log.warning("%s: the store ignored a conditional write (If-None-Match), so shard claims cannot "
                        "stop two runs started together from doing the same shard; its outputs are still "
                        "written once (the commit replaces whole files)", self.uri)
        try:
            self.fs.rm(probe)
        except FileNotFoundError:
            pass

