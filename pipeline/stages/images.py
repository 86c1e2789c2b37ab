"""Image decode stage (CPU tasks): image bytes → fixed-size uint8 pixels, or a reject reason."""

from __future__ import annotations

from pipeline.data.images import RejectedImage, decode_image
from pipeline.data.rows import PIXEL_COLUMNS, RowBuffer, RowKind


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
