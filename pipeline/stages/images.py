"""Image decode stage (CPU tasks): image bytes → fixed-size uint8 pixels, or a reject reason; for the
score job, both images of an (output, input) pair (pipeline/stages/read.py: read_pairs)."""

from __future__ import annotations

from pipeline.data.images import RejectedImage, decode_image
from pipeline.data.rows import PIXEL_COLUMNS, SCORE_PIXEL_COLUMNS, RowBuffer, RowKind


def decode_images(batch: dict, size: int, resize: str, max_pixels: int, exif_transpose: bool = True) -> dict:
    rows = RowBuffer(PIXEL_COLUMNS)
    for i in range(len(batch["key"])):  # PIL decodes one image at a time; this is the CPU stage's whole job
        row = {c: batch[c][i] for c in ("shard", "key", "index", "kind", "error", "member_names", "member_data")}
        if row["kind"] == RowKind.SAMPLE:
            try:
                row["pixels"] = decode_image(bytes(batch["image"][i]), size, resize, max_pixels,
                                             exif_transpose=exif_transpose)
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
