"""Image decode stage (CPU tasks): image bytes → fixed-size uint8 pixels, or a reject reason; for the
score job, both images of an (output, input) pair (pipeline/stages/read.py: read_pairs)."""

from __future__ import annotations

import numpy as np

from pipeline.data.images import RejectedImage, decode_image
from pipeline.data.rows import PIXEL_COLUMNS, SCORE_PIXEL_COLUMNS, RowBuffer, RowKind


def decode_images(batch: dict, size: int | None, resize: str, max_pixels: int, exif_transpose: bool = True,
                  filter: str = "bicubic") -> dict:
    """Encoded images → uint8 pixels of ``size`` (None: as stored, the eval job's; pipeline/data/images.py)."""
    rows = RowBuffer(PIXEL_COLUMNS)
    for i in range(len(batch["key"])):  # PIL decodes one image at a time; this is the CPU stage's whole job
        row = {c: batch[c][i] for c in ("shard", "key", "index", "kind", "error", "member_names", "member_data")}
        if row["kind"] == RowKind.SAMPLE:
            try:
                row["pixels"] = decode_image(bytes(batch["image"][i]), size, resize, max_pixels,
                                             exif_transpose=exif_transpose, filter=filter)
            except RejectedImage as exc:  # the reason names every member the sample loses
                lost = [str(batch["image_name"][i]), *(f"{row['key']}.{e}" for e in row["member_names"])]
                row.update(kind=RowKind.REJECT, error=f"{exc} (has {', '.join(map(repr, lost))})")
        rows.add(**row)
    return rows.batch()


def decode_pairs(batch: dict, size: int, resize: str, max_pixels: int, exif_transpose: bool = True) -> dict:
    """Encoded output (and input) images → uint8 pixels of ``image.size``, as translate decoded its input."""
    rows = RowBuffer(SCORE_PIXEL_COLUMNS)
    for i in range(len(batch["key"])):  # PIL decodes one image at a time; this is the CPU stage's whole job
        row = {c: batch[c][i] for c in ("shard", "key", "index", "kind", "error")}
        if row["kind"] == RowKind.SAMPLE:
            which = "output"
            try:
                row["pixels"] = decode_image(bytes(batch["image"][i]), size, resize, max_pixels,
                                             exif_transpose=exif_transpose)
                which = "input"
                if len(batch["input_image"][i]):
                    row["input_pixels"] = decode_image(bytes(batch["input_image"][i]), size, resize, max_pixels,
                                                       exif_transpose=exif_transpose)
            except RejectedImage as exc:  # the pair is unusable: neither image goes on
                # "input image …" tells the commit to name the input's member (ShardLedger.expect)
                row = {"shard": row["shard"], "key": row["key"], "index": row["index"], "kind": RowKind.REJECT,
                       "error": f"{which} image of key {row['key']!r} (shard {row['shard']!r}): {exc}"}
        rows.add(**row)
    return rows.batch()


def decode_for_features(batch: dict, size: int | None, resize: str, max_pixels: int, exif_transpose: bool = True,
                        filter: str = "bicubic") -> dict:
    """The eval job's decode: pixels as ``decode_images`` gives them, plus the PSNR/SSIM the job that made
    the image recorded in its carried ``latentshift.json`` (``recorded_quality``; NaN where it has none)."""
    from pipeline.data.output_kinds import PROVENANCE_MEMBER, recorded_quality

    out = decode_images(batch, size, resize, max_pixels, exif_transpose, filter)
    psnr, ssim = np.full(len(out["key"]), np.nan, np.float32), np.full(len(out["key"]), np.nan, np.float32)
    for i in range(len(out["key"])):  # a few bytes of JSON per image, on the CPU stage beside the decode
        names = list(batch["member_names"][i])
        if PROVENANCE_MEMBER in names:
            psnr[i], ssim[i] = recorded_quality(bytes(batch["member_data"][i][names.index(PROVENANCE_MEMBER)]))
    return {**out, "psnr": psnr, "ssim": ssim}
