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

import posixpath
import time
import uuid
from dataclasses import dataclass, field

from pipeline.data.claims import Claims
from pipeline.data.output_kinds import OUTPUT_KINDS, ShardParts, StagedPart
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
        """Write a part's files (by extension: ``tar``, ``parquet``, … as its output kinds stage them),
        then its manifest (last). Returns the part name."""
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


def merge_parts(store: OutputStore, run_id: str, shard: str, parts: list[str], owns: tuple[str, ...] = ()) -> dict:
    """Merge staged parts of one shard into its final outputs, one file per output kind
    (``OUTPUT_KINDS``); return their counts for the ledger.

    Each row index is taken once, from the first part (in name order) that has it; records are
    written in input order. Of the kinds in ``owns`` (``Job.commits``), a file this merge does not
    write is removed: an earlier commit's (every sample rejected this time, no latents asked for,
    no scores) would otherwise sit beside the new outputs as if it were theirs.
    """
    staging = store.staging(run_id, shard)
    expected = posixpath.join(staging, EXPECTED)
    read_record = store.get_json(expected) if store.exists(expected) else {}
    staged, taken, key_order = [], set(), {}
    for part in sorted(parts):
        manifest = store.get_json(f"{staging}/{part}.json")
        indices = {int(i) for i in manifest["indices"]}
        # a key's position is that of its SAMPLE row: a REJECT row may share the key (a duplicate)
        key_index = {k: int(i) for i, k in manifest["samples"]}
        key_order.update(key_index)
        staged.append(StagedPart(part, manifest, indices - taken, key_index,
                                 read=lambda ext, part=part: store.get(f"{staging}/{part}.{ext}")))
        taken |= indices
    merging, counts = ShardParts(shard, staged, key_order, read_record), {}
    for kind in OUTPUT_KINDS:
        data, kind_counts = kind.merge(merging)
        counts.update(kind_counts)
        if data is not None:
            store.put(kind.path(store, shard), data)
        elif kind.name in owns:
            kind.remove(store, shard)
    return counts
