"""The kinds of output a commit writes per shard, one class each; ``OUTPUT_KINDS`` lists them.

  images    images/<shard>.tar         the output samples (image, further images, provenance, carried members)
  latents   latents/<shard>.parquet    one row per (sample, step) (pipeline/data/latents.py)
  scores    scores/<shard>.parquet     one row per (sample, rank) (pipeline/data/scores.py)
  features  <control>/features/<shard>.parquet   the eval job's: one row per image (pipeline/data/features.py)
  rejects   _rejects/<shard>.jsonl     one line per row that could not be used (``reject_line``)

A kind knows, for one shard, everything between a model batch and its final file:

  ``name``     the word ``Job.commits`` uses for it (pipeline/runtime/job.py)
  ``path``     where its file lies under the output store
  ``rows``     what one row of a model batch (``OUTPUT_COLUMNS``) gives it: none, one or several records
  ``stage``    how a part holds a shard's records in staging: a file named by its extension, or the
               part's manifest (the rejects, which the commit's row count reads anyway)
  ``merge``    the shard's staged parts → its final bytes (None: nothing to write) and what the
               ledger record counts of it
  ``remove``   its file, when a commit of a job that owns the kind has none of it

The writer (pipeline/stages/write.py) asks every kind for its rows and stages them; the commit
(``merge_parts``, pipeline/data/ledger.py) merges every kind and writes or removes its file. A new
output is one class here and its entry in ``OUTPUT_KINDS`` (and its name in the ``commits`` of the
jobs that write it). The rules every kind keeps: a row index is merged from the first part that
holds it (``StagedPart.fresh``: a retried task may stage its rows twice), and records follow the
input order (``ShardParts.key_order``).
"""

from __future__ import annotations

import io
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pipeline.data.rows import Provenance, RowKind, members, search_choice

if TYPE_CHECKING:
    import pyarrow as pa

class OutputStore(Protocol):
    """What a kind needs of the output store (pipeline/data/outputs.py ``OutputStore``, which uses the kinds
    for its path helpers: stated here, not imported, so the two modules do not import each other)."""

    def path(self, *parts: str) -> str: ...

    def ctl(self, *parts: str) -> str: ...

    def remove(self, path: str) -> None: ...


PROVENANCE_MEMBER = "latentshift.json"  # the input's own .json member is carried through unchanged
LAST = 1 << 62  # the position of a key no SAMPLE row names: after every sample


@dataclass(frozen=True)
class WriteSettings:
    """What the writer knows beside a batch: the run's provenance, and the format of its images."""

    provenance: Provenance
    image_format: str


@dataclass
class Part:
    """One part of a shard as the writer builds it: files by extension (staged first), and its manifest."""

    files: dict[str, bytes] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


@dataclass
class StagedPart:
    """One staged part as the commit reads it."""

    name: str
    manifest: dict
    fresh: set[int]  # the row indices no earlier part holds: this part gives them
    key_index: dict[str, int]  # its SAMPLE rows: key → row index
    read: Callable[[str], bytes]  # one of its staged files, by extension

    def file(self, ext: str) -> bytes | None:
        return self.read(ext) if ext in self.manifest["files"] else None


@dataclass
class ShardParts:
    """One shard's staged parts, in part-name order, and what the reader recorded of the shard."""

    shard: str
    parts: list[StagedPart]
    key_order: dict[str, int]  # every SAMPLE key → its position in the shard
    read_record: dict  # the reader's ``expected.json`` (``ShardLedger.expect``)


class OutputKind(ABC):
    """One kind of file a commit writes per shard (see the module's docstring)."""

    name: str

    @abstractmethod
    def path(self, store: OutputStore, shard: str) -> str: ...

    @abstractmethod
    def rows(self, batch: dict, i: int, shard: str, settings: WriteSettings) -> list:
        """Row ``i`` of a model batch (SAMPLE, REJECT or LATENT) → this kind's records of it."""

    @abstractmethod
    def stage(self, records: list, settings: WriteSettings, part: Part) -> None:
        """Put one part's records (never none) into the part."""

    @abstractmethod
    def merge(self, shard: ShardParts) -> tuple[bytes | None, dict]:
        """The shard's final file (None: no record of this kind) and the ledger record's counts of it."""

    def remove(self, store: OutputStore, shard: str) -> None:
        store.remove(self.path(store, shard))


class Images(OutputKind):
    name = "images"

    def path(self, store, shard):
        return store.path("images", f"{shard}.tar")

    def rows(self, batch, i, shard, settings):
        if int(batch["kind"][i]) != RowKind.SAMPLE or batch["pixels"][i].size == 0:
            return []  # encode and score samples have no output image
        from pipeline.data.images import encode_image

        fmt, latent_rows = settings.image_format, int(batch["latent_rows"][i])
        out = {fmt: encode_image(batch["pixels"][i], fmt),
               PROVENANCE_MEMBER: settings.provenance.to_json(batch, i, latent_rows)}
        for name, extra in zip(batch["extra_names"][i], batch["extra_pixels"][i], strict=True):
            out[f"{name}.{fmt}"] = encode_image(extra, fmt)  # edit: one image per further scale
        for ext, data in members(batch, i).items():
            out.setdefault(ext, data)
        return [(str(batch["key"][i]), out)]

    def stage(self, records, settings, part):
        from pipeline.data.shards import write_samples

        buf = io.BytesIO()
        write_samples(buf, records)
        part.files["tar"] = buf.getvalue()

    def merge(self, shard):
        from pipeline.data.shards import iter_tar_samples, write_samples

        samples: dict[int, tuple[str, dict]] = {}
        for part in shard.parts:
            data = part.file("tar")
            if data is None:
                continue
            for item in iter_tar_samples(io.BytesIO(data)):
                if isinstance(item, Exception):
                    raise RuntimeError(f"staged part {part.name} of {shard.shard} is damaged: {item}")
                index = part.key_index[item.key]
                if index in part.fresh:
                    samples[index] = (item.key, item.members)
        if not samples:
            return None, {"images": 0, "bytes_images": 0}
        buf = io.BytesIO()
        count = write_samples(buf, (samples[i] for i in sorted(samples)))
        return buf.getvalue(), {"images": count, "bytes_images": buf.tell()}


class Latents(OutputKind):
    name = "latents"

    def path(self, store, shard):
        return store.path("latents", f"{shard}.parquet")

    def rows(self, batch, i, shard, settings):
        if int(batch["kind"][i]) != RowKind.LATENT:
            return []
        from pipeline.data.latents import latent_row

        meta, m = settings.provenance.latents, batch["latent"][i]
        return [latent_row(key=str(batch["key"][i]), shard=shard, model=meta.model, method=meta.method,
                           timesteps=batch["timesteps"][i], eta=meta.eta, cond=meta.cond, seed=int(batch["seed"][i]),
                           step=int(batch["step"][i]), shape=m.shape, dtype=m.dtype.name,
                           latent=np.ascontiguousarray(m).tobytes())]

    def stage(self, records, settings, part):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.data.latents import LATENT_SCHEMA

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=LATENT_SCHEMA), buf, compression="zstd")
        part.files["parquet"] = buf.getvalue()

    def merge(self, shard):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.data.latents import LATENT_SCHEMA

        # a latent row has no index of its own: each (key, step) is taken once, from the first part
        seen: set[tuple[str, int]] = set()
        tables = []
        for part in shard.parts:
            data = part.file("parquet")
            if data is None:
                continue
            table = pq.read_table(io.BytesIO(data))
            keep = []
            for i, key_step in enumerate(zip(table["key"].to_pylist(), table["step"].to_pylist(), strict=True)):
                if key_step not in seen:
                    seen.add(key_step)
                    keep.append(i)
            tables.append(take(table, keep))
        if not tables:
            return None, {"bytes_latents": 0}
        table = in_input_order(pa.concat_tables(tables).cast(LATENT_SCHEMA), "step", shard.key_order)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=256)
        return buf.getvalue(), {"bytes_latents": buf.tell(), "latent_samples": len(set(table["key"].to_pylist()))}


class Scores(OutputKind):
    name = "scores"

    def path(self, store, shard):
        return store.path("scores", f"{shard}.parquet")

    def rows(self, batch, i, shard, settings):
        clip, directional = float(batch["clip_score"][i]), float(batch["directional"][i])
        if int(batch["kind"][i]) != RowKind.SAMPLE or (math.isnan(clip) and math.isnan(directional)):
            return []
        return score_rows(batch, i, shard, settings.provenance)

    def stage(self, records, settings, part):
        from pipeline.data.scores import scores_to_bytes

        p = settings.provenance
        part.files["scores"] = scores_to_bytes(records, {"job": p.job, "config_hash": p.config_hash,
                                                         "latentshift": p.latentshift, "settings": p.settings})

    def merge(self, shard):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.data.scores import SCORE_SCHEMA

        tables = fresh_tables(shard, "scores")
        if not tables:
            return None, {}
        # the parts' metadata (the run's settings, pipeline/data/scores.py) survives the cast
        table = pa.concat_tables(tables).cast(SCORE_SCHEMA.with_metadata(tables[0].schema.metadata or {}))
        table = in_input_order(table, "rank", shard.key_order)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue(), {"scored": len(set(table["key"].to_pylist()))}


class Features(OutputKind):
    name = "features"

    def path(self, store, shard):
        return store.ctl("features", f"{shard}.parquet")  # beside the eval job's ledger: its own record

    def rows(self, batch, i, shard, settings):
        if int(batch["kind"][i]) != RowKind.SAMPLE or batch["features"][i].size == 0:
            return []
        return [(str(batch["key"][i]), np.asarray(batch["features"][i], dtype=np.float32), float(batch["psnr"][i]),
                 float(batch["ssim"][i]))]

    def stage(self, records, settings, part):
        from pipeline.data.features import features_table, table_to_bytes

        keys, vectors, psnr, ssim = zip(*records, strict=True)
        part.files["features"] = table_to_bytes(features_table(list(keys), np.stack(vectors), psnr, ssim,
                                                               settings.provenance.settings))

    def merge(self, shard):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = fresh_tables(shard, "features")
        if not tables:
            return None, {}
        table = pa.concat_tables(tables)  # the parts' schemas (and metadata) are the run's: one network
        order = [shard.key_order.get(k, LAST) for k in table["key"].to_pylist()]
        table = table.take(sorted(range(len(order)), key=order.__getitem__))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue(), {"featured": len(table)}


class Rejects(OutputKind):
    name = "rejects"

    def path(self, store, shard):
        return store.ctl("_rejects", f"{shard}.jsonl")

    def rows(self, batch, i, shard, settings):
        if int(batch["kind"][i]) != RowKind.REJECT:
            return []
        return [{"shard": shard, "key": str(batch["key"][i]), "index": int(batch["index"][i]),
                 "reason": str(batch["error"][i])}]

    def stage(self, records, settings, part):
        part.manifest["rejects"] = records  # in the manifest: no file to write for a few short lines

    def merge(self, shard):
        from pipeline.data.shards import DROPPED_MEMBER

        lines: dict[int, dict] = {}
        for part in shard.parts:
            for line in part.manifest.get("rejects", []):
                if int(line["index"]) in part.fresh:
                    lines[int(line["index"])] = reject_line(shard.shard, line, shard.read_record)
        dropped = sum(1 for r in lines.values() if r["reason"].startswith(DROPPED_MEMBER))
        counts = {"rejected": len(lines) - dropped, "dropped": dropped}
        if not lines:
            return None, counts
        return "".join(json.dumps(lines[i], sort_keys=True) + "\n" for i in sorted(lines)).encode(), counts


IMAGES, LATENTS, SCORES, FEATURES, REJECTS = Images(), Latents(), Scores(), Features(), Rejects()
OUTPUT_KINDS: tuple[OutputKind, ...] = (IMAGES, LATENTS, SCORES, FEATURES, REJECTS)  # merged and written in this order


def fresh_tables(shard: ShardParts, ext: str) -> list[pa.Table]:
    """Each part's staged Parquet file ``ext`` as a table of the rows that part gives (``StagedPart.fresh``)."""
    import pyarrow.parquet as pq

    tables = []
    for part in shard.parts:
        data = part.file(ext)
        if data is not None:
            table = pq.read_table(io.BytesIO(data))
            tables.append(take(table, [i for i, k in enumerate(table["key"].to_pylist())
                                       if part.key_index.get(k) in part.fresh]))
    return tables


def take(table: pa.Table, rows: list[int]) -> pa.Table:
    """``table``'s ``rows``; none too (a retried part whose rows earlier parts hold: pyarrow cannot
    take a plain empty list, whose type it does not know)."""
    import pyarrow as pa

    return table.take(pa.array(rows, pa.int64()))


def in_input_order(table: pa.Table, then: str, key_order: dict[str, int]) -> pa.Table:
    """``table``'s rows by their key's position in the shard, then by the column ``then``."""
    rank = [(key_order.get(k, LAST), v) for k, v in zip(table["key"].to_pylist(), table[then].to_pylist(), strict=True)]
    return table.take(sorted(range(len(rank)), key=rank.__getitem__))


def score_rows(batch: dict, i: int, shard: str, provenance: Provenance) -> list[dict]:
    """A scored sample's rows of ``scores/<shard>.parquet``: rank 0 its output, then a search's runners-up."""
    from pipeline.data.scores import score_row

    key, candidate = str(batch["key"][i]), int(batch["candidate"][i])
    grid = provenance.settings.get("search")
    if grid is None or candidate < 0:
        return [score_row(key=key, shard=shard, clip_score=batch["clip_score"][i], directional=batch["directional"][i])]
    rows = []
    for rank, (c, value) in enumerate(zip(batch["ranked"][i], batch["ranked_scores"][i], strict=True)):
        rows.append(score_row(key=key, shard=shard, rank=rank, candidate=int(c), directional=float(value),
                              clip_score=batch["clip_score"][i] if rank == 0 else math.nan,
                              choice=search_choice(grid, int(c))))
    return rows


def recorded_quality(provenance: bytes) -> tuple[float, float]:
    """(PSNR, SSIM) a sample's ``latentshift.json`` records against its input: NaN, NaN where it records
    none (or cannot be read); a null PSNR (identical images: JSON has no inf) is +inf."""
    try:
        record = json.loads(provenance)
    except (ValueError, UnicodeDecodeError):
        return math.nan, math.nan
    if not isinstance(record, dict) or record.get("ssim") is None:
        return math.nan, math.nan
    psnr = record.get("psnr")
    return (math.inf if psnr is None else float(psnr)), float(record["ssim"])


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
