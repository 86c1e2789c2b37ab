"""Write stage (CPU tasks): stage each batch's rows as parts of their shards.

Per (batch, shard) it stages one part through the shard ledger: ``tar`` (samples, with their
provenance serialised here, once), ``parquet`` (LATENT rows), then the part's manifest. It
returns one small manifest row per part; PARTIAL rows go on to the driver as they are.
"""

from __future__ import annotations

import io
import math

import numpy as np

from pipeline.data.images import encode_image
from pipeline.data.latents import LATENT_SCHEMA, latent_row
from pipeline.data.ledger import ShardLedger
from pipeline.data.rows import (
    MANIFEST_COLUMNS,
    Provenance,
    RowBuffer,
    RowKind,
    members,
    search_choice,
)
from pipeline.data.scores import score_row, scores_to_bytes
from pipeline.data.shards import write_samples

PSNR_OF_IDENTICAL = 100.0  # dB counted for identical images in the run's mean PSNR
PROVENANCE_MEMBER = "latentshift.json"  # the input's own .json member is carried through unchanged


def write_parts(batch: dict, ledger: ShardLedger, image_format: str, provenance: Provenance) -> dict:
    manifest = RowBuffer(MANIFEST_COLUMNS)
    kinds = np.asarray(batch["kind"])
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(batch["shard"]):
        if kinds[i] == RowKind.PARTIAL:
            manifest.add(kind=RowKind.PARTIAL, partial=bytes(batch["partial"][i]))
        else:
            by_shard.setdefault(str(shard), []).append(i)
    for shard, idx in by_shard.items():
        manifest.add(**_stage_part(batch, idx, shard, ledger, image_format, provenance))
    return manifest.batch()


def _stage_part(batch: dict, idx: list[int], shard: str, ledger: ShardLedger, image_format: str,
                provenance: Provenance) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples, rejects, latents, indices, sample_keys, scores = [], [], [], [], [], []
    psnr_sum = ssim_sum = clip_sum = directional_sum = 0.0
    metric_count = expected_latents = score_count = directional_count = 0
    for i in idx:
        key, index, kind = str(batch["key"][i]), int(batch["index"][i]), int(batch["kind"][i])
        if kind == RowKind.LATENT:
            meta, m = provenance.latents, batch["latent"][i]
            latents.append(latent_row(
                key=key, shard=shard, model=meta.model, method=meta.method, timesteps=batch["timesteps"][i],
                eta=meta.eta, cond=meta.cond, seed=int(batch["seed"][i]), step=int(batch["step"][i]),
                shape=m.shape, dtype=m.dtype.name, latent=np.ascontiguousarray(m).tobytes()))
            continue
        indices.append(index)
        if kind == RowKind.REJECT:
            rejects.append({"shard": shard, "key": key, "index": index, "reason": str(batch["error"][i])})
            continue
        sample_keys.append([index, key])
        expected_latents += int(batch["latent_rows"][i])
        psnr, ssim = float(batch["psnr"][i]), float(batch["ssim"][i])
        if not math.isnan(ssim):  # translate: psnr is inf where output == input
            psnr_sum += psnr if math.isfinite(psnr) else PSNR_OF_IDENTICAL
            ssim_sum += ssim
            metric_count += 1
        clip, directional = float(batch["clip_score"][i]), float(batch["directional"][i])
        if not (math.isnan(clip) and math.isnan(directional)):
            scores += _score_rows(batch, i, shard, provenance)
            if not math.isnan(clip):
                clip_sum += clip
                score_count += 1
            if not math.isnan(directional):
                directional_sum += directional
                directional_count += 1
        pixels = batch["pixels"][i]
        if pixels.size == 0:  # encode: latents only, no image
            continue
        out = {image_format: encode_image(pixels, image_format),
               PROVENANCE_MEMBER: provenance.to_json(batch, i, int(batch["latent_rows"][i]))}
        for name, extra in zip(batch["extra_names"][i], batch["extra_pixels"][i], strict=True):
            out[f"{name}.{image_format}"] = encode_image(extra, image_format)  # edit: one image per further scale
        for ext, data in members(batch, i).items():
            out.setdefault(ext, data)
        samples.append((key, out))

    files = {}
    if samples:
        buf = io.BytesIO()
        write_samples(buf, samples)
        files["tar"] = buf.getvalue()
    if latents:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(latents, schema=LATENT_SCHEMA), buf, compression="zstd")
        files["parquet"] = buf.getvalue()
    if scores:
        files["scores"] = scores_to_bytes(scores, {"job": provenance.job, "config_hash": provenance.config_hash,
                                                   "latentshift": provenance.latentshift,
                                                   "settings": provenance.settings})
    part = ledger.stage_part(shard, files, {"indices": indices, "samples": sample_keys, "rejects": rejects})
    return {"shard": shard, "part": part, "kind": RowKind.SAMPLE, "rows": len(indices), "latent_rows": len(latents),
            "latent_rows_expected": expected_latents, "images": len(samples), "rejected": len(rejects),
            "psnr_sum": psnr_sum, "ssim_sum": ssim_sum, "metric_count": metric_count, "clip_score_sum": clip_sum,
            "directional_sum": directional_sum, "score_count": score_count,
            "directional_count": directional_count}


def _score_rows(batch: dict, i: int, shard: str, provenance: Provenance) -> list[dict]:
    """A scored sample's rows of ``scores/<shard>.parquet``: rank 0 its output, then a search's runners-up."""
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
