"""Write stage (CPU tasks): stage each batch's rows as parts of their shards.

Per (batch, shard) it stages one part through the shard ledger: every output kind's records of
the rows (``OUTPUT_KINDS``, pipeline/data/output_kinds.py: images tar with the provenance
serialised here, once; latents and scores Parquet; reject lines), then the part's manifest. It
returns one small manifest row per part, with the part's quality and score sums (``RunMetrics``);
PARTIAL rows go on to the driver as they are.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.ledger import ShardLedger
from pipeline.data.output_kinds import IMAGES, LATENTS, OUTPUT_KINDS, REJECTS, Part, WriteSettings
from pipeline.data.rows import MANIFEST_COLUMNS, Provenance, RowBuffer, RowKind
from pipeline.data.run_metrics import RunMetrics


def write_parts(batch: dict, ledger: ShardLedger, image_format: str, provenance: Provenance) -> dict:
    manifest = RowBuffer(MANIFEST_COLUMNS)
    settings = WriteSettings(provenance, image_format)
    kinds = np.asarray(batch["kind"])
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(batch["shard"]):
        if kinds[i] == RowKind.PARTIAL:
            manifest.add(kind=RowKind.PARTIAL, partial=bytes(batch["partial"][i]))
        else:
            by_shard.setdefault(str(shard), []).append(i)
    for shard, idx in by_shard.items():
        manifest.add(**_stage_part(batch, idx, shard, ledger, settings))
    return manifest.batch()


def _stage_part(batch: dict, idx: list[int], shard: str, ledger: ShardLedger, settings: WriteSettings) -> dict:
    """One part of ``shard`` from rows ``idx``; its manifest row tells the driver what the part holds
    (``CommitTracker`` counts rows and latent rows against what the reader and the samples announced)."""
    records = {kind: [] for kind in OUTPUT_KINDS}
    indices, sample_keys, expected_latents, metrics = [], [], 0, RunMetrics()
    for i in idx:
        for kind in OUTPUT_KINDS:
            records[kind] += kind.rows(batch, i, shard, settings)
        row_kind, index = int(batch["kind"][i]), int(batch["index"][i])
        if row_kind == RowKind.LATENT:  # a map of a sample's latent: the sample holds the index
            continue
        indices.append(index)
        if row_kind == RowKind.SAMPLE:
            sample_keys.append([index, str(batch["key"][i])])
            expected_latents += int(batch["latent_rows"][i])
            metrics.add(batch, i)

    part = Part(manifest={"indices": indices, "samples": sample_keys})
    for kind, kept in records.items():
        if kept:
            kind.stage(kept, settings, part)
    name = ledger.stage_part(shard, part.files, part.manifest)
    return {"shard": shard, "part": name, "kind": RowKind.SAMPLE, "rows": len(indices),
            "latent_rows": len(records[LATENTS]), "latent_rows_expected": expected_latents,
            "images": len(records[IMAGES]), "rejected": len(records[REJECTS]), **metrics.as_columns()}
