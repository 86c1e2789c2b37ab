"""The shard ledger: how a shard's outputs become visible exactly once. The rule lives here.

  0. Whoever produces a shard's rows first claims it:   ``begin(shard)`` (false: another live run
     holds it, or it was committed meanwhile; ``pipeline/data/claims.py``)
  1. The reader of a shard says how many rows it has:   ``expect(shard, rows)``
  2. Writers stage parts of it, each part's files first and its manifest last:   ``stage_part``
     (a manifest lists every row index it holds, ``[index, key]`` of its SAMPLE rows, and
     its reject lines)
  3. The driver counts what the manifests report (``CommitTracker``); when every expected row
     and every latent row a sample announced is staged, the shard is complete.
  4. ``commit``: if the run still holds the shard's claim, merge the parts into the final files
     (one atomic write each), then write the ledger record ``_ledger/<shard>.json``, then give
     the claim up. The record is the commit point: a shard with a record is done, and a re-run
     skips it; a shard without one is redone from scratch.

Parts may overlap (a retried task stages its batch twice): each sample index is taken once.
A run removes its own staging at its end; a killed run's staging is removed by the next run,
once the killed run's lease has run out. A live run's staging is never touched by another.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field

from pipeline.data.claims import Claims
from pipeline.data.outputs import OutputStore

EXPECTED = "expected.json"


@dataclass
class ShardLedger:
    """One run's view of the ledger under ``store``; picklable, so workers can use it."""

    store: OutputStore
    run_id: str
    redo_committed: bool = False  # --overwrite, or a job that covers all its input each run
    lease_seconds: float = 300.0  # output.lease_seconds

    @property
    def claims(self) -> Claims:
        return Claims(self.store, self.run_id, self.lease_seconds)

    # ---- worker side ---------------------------------------------------------------
    def begin(self, shard: str) -> bool:
        """Claim ``shard`` before producing its rows. False: another live run is doing it, or (unless
        redoing committed shards) it was committed since the run listed it."""
        claims = self.claims
        if not claims.take(shard):
            return False
        if not self.redo_committed and self.store.exists(self.store.ledger(shard)):
            claims.release(shard)
            return False
        return True

    def expect(self, shard: str, rows: int, members: dict[int, str] | None = None,
               input_members: dict[int, str] | None = None) -> None:
        """The reader's count of a shard's sample rows (REJECT rows included), and the tar member each
        row is about, so that a reject line names it whichever stage rejects the row (a row's columns
        do not all travel through the model stages): ``members`` for a REJECT row, the member at
        fault; for a SAMPLE row, its image member (what a later decode reject is about).
        ``input_members``: the score job's input image members, for rejects of the input image."""
        record: dict = {"rows": int(rows)}
        if members:
            record["members"] = {str(i): name for i, name in members.items()}
        if input_members:
            record["input_members"] = {str(i): name for i, name in input_members.items()}
        self.store.put_json(posixpath.join(self.store.staging(self.run_id, shard), EXPECTED), record)

    def stage_part(self, shard: str, files: dict[str, bytes], manifest: dict) -> str:
        """Write a part's files (``tar``, ``parquet``), then its manifest (last). Returns the part name."""
        part = f"part-{uuid.uuid4().hex}"
        base = posixpath.join(self.store.staging(self.run_id, shard), part)
        for ext, data in files.items():
            self.store.put(f"{base}.{ext}", data)
        self.store.put_json(f"{base}.json", {**manifest, "files": sorted(files)})
        return part

    # ---- driver side ---------------------------------------------------------------
    def expected_rows(self, shard: str) -> int | None:
        path = posixpath.join(self.store.staging(self.run_id, shard), EXPECTED)
        return int(self.store.get_json(path)["rows"]) if self.store.exists(path) else None

    def commit(self, shard: str, input_uri: str, parts: list[str], job: str, config_hash: str,
               rows_in: int, versions: dict, owns: tuple[str, ...] = ()) -> dict:
        """Merge one shard's parts into its outputs, then write its ledger record (the commit point).
        ``owns``: the output kinds the job writes (``Job.commits``); those this commit has none of are
        removed, so a shard done again (--overwrite) keeps no file of the run before.

        Refused, with ``{"lost": True}``, when another run has taken the shard over (this run's
        lease ran out while it worked): that run writes it.
        """
        claims = self.claims
        if not claims.holds(shard):
            return {"shard": shard, "lost": True}
        counts = merge_parts(self.store, self.run_id, shard, parts, owns)
        record = {"shard": shard, "input": input_uri, "job": job, "run_id": self.run_id, "rows_in": rows_in,
                  **counts, "config_hash": config_hash, "versions": versions, "committed_at": time.time()}
        self.store.put_json(self.store.ledger(shard), record)
        claims.release(shard)
        self.store.remove_tree(self.store.staging(self.run_id, shard))
        return record

    def committed(self) -> set[str]:
        return self.store.committed()

    def clear_dead_staging(self) -> list[str]:
        """Remove the staging (and lease) of every run that is not alive: killed runs, whose
        uncommitted shards are redone. Returns their run ids."""
        runs = {posixpath.basename(p.rstrip("/")) for p in self.store.listdir(self.store.ctl("_staging"))}
        runs |= {posixpath.basename(p)[: -len(".json")] for p in self.store.listdir(self.store.lease())
                 if p.endswith(".json")}
        dead = self.claims.dead_runs(sorted(runs - {self.run_id}))
        for run in dead:
            self.store.remove_tree(self.store.staging(run))
            self.store.remove(self.store.lease(run))
        return dead

    def finish(self, shards=()) -> None:
        """End of this run, whatever happened: give up the claims it still holds among ``shards``
        (left undone: the next run takes them at once), remove its staging, and the control folders
        left empty (``_staging/`` when no other run has any there; ``_leases/`` goes when the lease
        does, ``Claims.end``)."""
        self.claims.release_all(shards)
        self.store.remove_tree(self.store.staging(self.run_id))
        self.store.remove_empty_control_folders()

    def taken_by(self, shard: str) -> str | None:
        """The other run that holds ``shard`` now, or committed it; None if it is this run's to finish."""
        holder = self.claims.holder(shard)
        if holder is None and self.store.exists(self.store.ledger(shard)):
            holder = self.store.get_json(self.store.ledger(shard)).get("run_id")
        return holder if holder != self.run_id else None

    def record_run(self, summary: dict) -> str:
        path = self.store.ctl("_ledger", "runs", f"{self.run_id}.json")
        self.store.put_json(path, summary)
        return path


@dataclass
class ShardProgress:
    parts: list[str] = field(default_factory=list)
    rows: int = 0
    latent_rows: int = 0
    latent_rows_expected: int = 0
    expected_rows: int | None = None
    committed: bool = False


class CommitTracker:
    """The driver's count of staged rows per shard; says which shards are complete."""

    def __init__(self, ledger: ShardLedger, shards: list[str]):
        self.ledger = ledger
        self.progress = {s: ShardProgress() for s in shards}

    def add(self, shard: str, part: str, rows: int, latent_rows: int, latent_rows_expected: int) -> None:
        p = self.progress[shard]
        p.parts.append(part)
        p.rows += rows
        p.latent_rows += latent_rows
        p.latent_rows_expected += latent_rows_expected

    def complete(self, shard: str) -> bool:
        """Every expected row and every announced latent row staged, and not yet handed to commit."""
        p = self.progress[shard]
        if p.committed:
            return False
        if p.expected_rows is None:
            p.expected_rows = self.ledger.expected_rows(shard)  # written by the reader; may not exist yet
            if p.expected_rows is None:
                return False
        return p.rows >= p.expected_rows and p.latent_rows >= p.latent_rows_expected

    def take(self, shard: str) -> ShardProgress:
        """Mark a complete shard as handed to commit."""
        self.progress[shard].committed = True
        return self.progress[shard]

    def incomplete(self) -> list[str]:
        return [s for s, p in self.progress.items() if not p.committed]


def reject_line(shard: str, staged: dict, read_record: dict) -> dict:
    """One line of ``_rejects/<shard>.jsonl``, the same fields in every job:

    - ``shard``: the shard's basename (the unit of the ledger; for the score job, the output shard);
    - ``key``: the sample's ``__key__`` as the tar groups its members, raw, whatever it holds (an
      unsafe key such as ``../x`` too: JSON escapes any string, and nothing uses it as a path), so
      rejects join to inputs by key. ``""`` only for a line about no sample (an unreadable shard,
      a tar broken between two samples) or a member whose name has no key part (``.png``: its key
      *is* empty; ``member`` names it);
    - ``member``: the tar member at fault, by its full name in the tar (a dropped member, an empty
      or undecodable image, the member being read when the tar broke); ``""`` when the whole sample
      is at fault (unsafe key, no image member, duplicate key) — the reason lists its members then;
    - ``index``: the row's position in the shard (outputs keep input order);
    - ``reason``: deterministic text saying what is wrong; one about a single member of a sample that
      may live on starts with "dropped member", an empty image is "empty image member …" in every job.

    ``staged``: the writer's line (shard, key, index, reason); ``read_record``: the reader's
    ``expected.json``, which knows the member each row is about (``ShardLedger.expect``).
    """
    from pipeline.data.shards import INPUT_IMAGE

    index = str(int(staged["index"]))
    by_role = "input_members" if str(staged["reason"]).startswith(INPUT_IMAGE) else "members"
    member = read_record.get(by_role, {}).get(index, "")
    return {"shard": shard, "key": str(staged["key"]), "member": member, "index": int(staged["index"]),
            "reason": str(staged["reason"])}


def merge_parts(store: OutputStore, run_id: str, shard: str, parts: list[str], owns: tuple[str, ...] = ()) -> dict:
    """Merge staged parts of one shard into its final outputs; return counts for the ledger.

    Each sample index is taken once, from the first part that has it. Samples are written in
    input order. Of the kinds in ``owns`` (images, latents, scores, rejects), a file this merge does
    not write is removed: an earlier commit's (every sample rejected this time, no latents asked
    for, no scores) would otherwise sit beside the new outputs as if it were theirs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.latents import LATENT_SCHEMA
    from pipeline.data.shards import DROPPED_MEMBER, iter_tar_samples, write_samples

    staging = store.staging(run_id, shard)
    expected = posixpath.join(staging, EXPECTED)
    read_record = store.get_json(expected) if store.exists(expected) else {}
    samples: dict[int, tuple[str, dict]] = {}
    rejects: dict[int, dict] = {}
    latent_tables, score_tables = [], []
    key_order: dict[str, int] = {}  # key → its position in the shard
    seen_latent: set[tuple[str, int]] = set()
    for part in sorted(parts):
        manifest = store.get_json(f"{staging}/{part}.json")
        fresh = {int(i) for i in manifest["indices"]} - set(samples) - set(rejects)
        # a key's position is that of its SAMPLE row: a REJECT row may share the key (a duplicate)
        key_index = {k: int(i) for i, k in manifest["samples"]}
        key_order.update(key_index)
        if "tar" in manifest["files"]:
            for item in iter_tar_samples(io.BytesIO(store.get(f"{staging}/{part}.tar"))):
                if isinstance(item, Exception):
                    raise RuntimeError(f"staged part {part} of {shard} is damaged: {item}")
                idx = key_index[item.key]
                if idx in fresh:
                    samples[idx] = (item.key, item.members)
        for line in manifest.get("rejects", []):
            if int(line["index"]) in fresh:
                rejects[int(line["index"])] = reject_line(shard, line, read_record)
        if "parquet" in manifest["files"]:
            table = pq.read_table(io.BytesIO(store.get(f"{staging}/{part}.parquet")))
            keep = []
            for i, (k, s) in enumerate(zip(table["key"].to_pylist(), table["step"].to_pylist(), strict=True)):
                if (k, s) not in seen_latent:
                    seen_latent.add((k, s))
                    keep.append(i)
            latent_tables.append(table.take(keep))
        if "scores" in manifest["files"]:
            table = pq.read_table(io.BytesIO(store.get(f"{staging}/{part}.scores")))
            keep = [i for i, k in enumerate(table["key"].to_pylist()) if key_index.get(k) in fresh]
            score_tables.append(table.take(keep))

    dropped = sum(1 for r in rejects.values() if r["reason"].startswith(DROPPED_MEMBER))
    out = {"images": 0, "rejected": len(rejects) - dropped, "dropped": dropped, "bytes_images": 0, "bytes_latents": 0}
    if samples:
        buf = io.BytesIO()
        out["images"] = write_samples(buf, (samples[i] for i in sorted(samples)))
        store.put(store.images(shard), buf.getvalue())
        out["bytes_images"] = buf.tell()
    if latent_tables:
        table = pa.concat_tables(latent_tables).cast(LATENT_SCHEMA)
        rank = [(key_order.get(k, 1 << 62), s) for k, s in zip(table["key"].to_pylist(), table["step"].to_pylist(), strict=True)]
        table = table.take(sorted(range(len(rank)), key=rank.__getitem__))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=256)
        store.put(store.latents(shard), buf.getvalue())
        out["bytes_latents"] = buf.tell()
        out["latent_samples"] = len(set(table["key"].to_pylist()))
    if score_tables:
        from pipeline.data.scores import SCORE_SCHEMA

        # the parts' metadata (the run's settings, pipeline/data/scores.py) survives the cast
        table = pa.concat_tables(score_tables).cast(SCORE_SCHEMA.with_metadata(score_tables[0].schema.metadata or {}))
        rank = [(key_order.get(k, 1 << 62), r) for k, r in zip(table["key"].to_pylist(), table["rank"].to_pylist(), strict=True)]
        table = table.take(sorted(range(len(rank)), key=rank.__getitem__))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        store.put(store.scores(shard), buf.getvalue())
        out["scored"] = len(set(table["key"].to_pylist()))
    if rejects:
        body = "".join(json.dumps(rejects[i], sort_keys=True) + "\n" for i in sorted(rejects))
        store.put(store.rejects(shard), body.encode())
    written = {"images": bool(samples), "latents": bool(latent_tables), "scores": bool(score_tables),
               "rejects": bool(rejects)}
    for kind in owns:
        if kind in written and not written[kind]:
            store.remove(getattr(store, kind)(shard))
    return out
