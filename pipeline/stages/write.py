"""Write stage (CPU tasks): stage each batch's rows as parts of their shards.

Per (batch, shard) it writes ``part-<id>.tar`` (samples), ``part-<id>.parquet`` (latent rows)
and, last, ``part-<id>.json`` (the part's manifest), under ``_staging/<run>/<shard>/``. It
returns one small manifest row per part; the driver counts them and commits a shard when
all its rows are staged (pipeline.run).
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import uuid

import numpy as np

from pipeline.data.images import encode_image
from pipeline.data.latents import LATENT_SCHEMA, latent_row
from pipeline.data.outputs import OutputStore
from pipeline.data.shards import write_samples

PSNR_OF_IDENTICAL = 100.0  # dB counted for identical images in the run's mean PSNR
PROVENANCE_MEMBER = "latentshift.json"  # the input's own .json member is carried through unchanged

MANIFEST_COLUMNS = ("shard", "part", "samples", "latent_rows", "latent_rows_expected", "images", "rejected",
                    "psnr_sum", "ssim_sum", "metric_count", "forward")
FORWARD_STEP = -2  # rows a stage sends to the driver as they are (e.g. partial fits), not to storage


def write_parts(batch: dict, store: OutputStore, run_id: str, image_format: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest_rows = {c: [] for c in MANIFEST_COLUMNS}
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(batch["shard"]):
        if int(batch["step"][i]) == FORWARD_STEP:
            for col in MANIFEST_COLUMNS:
                manifest_rows[col].append({"shard": "", "part": "", "forward": bytes(batch["payload"][i])}.get(
                    col, 0.0 if col.endswith("_sum") else 0))
            continue
        by_shard.setdefault(str(shard), []).append(i)

    for shard, members in by_shard.items():
        part = f"part-{uuid.uuid4().hex}"
        base = posixpath.join(store.staging(run_id, shard), part)
        samples, rejects, latents, keys, indices = [], [], [], [], []
        psnr_sum = ssim_sum = 0.0
        metric_count = expected_latents = 0
        for i in members:
            key, index, step = str(batch["key"][i]), int(batch["index"][i]), int(batch["step"][i])
            if step >= 0:
                info = json.loads(batch["info"][i])
                latents.append(latent_row(
                    key=key, shard=shard, model=info["model"], method=info["method"], timesteps=info["timesteps"],
                    eta=info["eta"], cond=info["cond"], seed=info["seed"], step=step,
                    shape=batch["shape"][i].split(","), dtype=info["dtype"], latent=bytes(batch["payload"][i])))
                continue
            indices.append(index)
            keys.append((index, key))
            if batch["error"][i]:
                rejects.append({"shard": shard, "key": key, "index": index, "reason": str(batch["error"][i])})
                continue
            info = json.loads(batch["info"][i])
            expected_latents += int(info.get("latent_rows", 0))
            if "ssim" in info:  # translate: psnr is None where output == input (infinite PSNR)
                psnr_sum += info["psnr"] if info["psnr"] is not None else PSNR_OF_IDENTICAL
                ssim_sum += info.get("ssim") or 0.0
                metric_count += 1
            payload = bytes(batch["payload"][i])
            if not payload:  # encode: latents only, no image
                continue
            shape = tuple(int(v) for v in batch["shape"][i].split(","))
            members_out = {image_format: encode_image(np.frombuffer(payload, np.uint8).reshape(shape), image_format),
                           PROVENANCE_MEMBER: json.dumps(info, sort_keys=True).encode()}
            carried = json.loads(batch["extras"][i]) if batch["extras"][i] else {}
            for ext, b64 in carried.items():
                members_out.setdefault(ext, base64.b64decode(b64))
            samples.append((key, members_out))

        if samples:
            buf = io.BytesIO()
            write_samples(buf, samples)
            store.put(base + ".tar", buf.getvalue())
        if latents:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(latents, schema=LATENT_SCHEMA), buf, compression="zstd")
            store.put(base + ".parquet", buf.getvalue())
        store.put_json(base + ".json", {"indices": indices, "keys": [[i, k] for i, k in keys], "rejects": rejects,
                                        "has_tar": bool(samples), "has_latents": bool(latents)})
        for col, value in zip(MANIFEST_COLUMNS, (shard, part, len(indices), len(latents), expected_latents,
                                                 len(samples), len(rejects), psnr_sum, ssim_sum, metric_count, b""),
                              strict=True):
            manifest_rows[col].append(value)
    return {c: np.array(v, dtype=object if c in ("shard", "part", "forward") else None) for c, v in manifest_rows.items()}
