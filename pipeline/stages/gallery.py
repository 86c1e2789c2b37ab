"""Gallery stage (CPU tasks, no model): committed output shards → their gallery pages
(``pipeline/data/gallery.py``), and one SAMPLE row per sample shown, without pixels, so that the ledger
commits a shard of the gallery as it commits any job's: claimed before it is read, its rows counted
(``ShardLedger.expect``), its record written last. The pages are written in place before that record:
a shard whose record is missing is done again from an empty folder.
"""

from __future__ import annotations

from pipeline.config import GalleryConfig
from pipeline.data.gallery import build_shard, summary_path
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.data.rows import RowBuffer, RowKind

# the pages' own layout: raised when what build_shard writes of a shard changes (2: the shard in the
# order of each score, by-<score>-asc.html …), so that the shards shown before are shown again
LAYOUT_VERSION = 2


def layout(gallery: GalleryConfig) -> dict:
    """What a shard's pages depend on besides its data (kept in its summary): a change redoes them."""
    return {**gallery.model_dump(mode="json"), "layout_version": LAYOUT_VERSION}


def gallery_shards(batch: dict, output_uri: str, output_options: dict, inputs: dict[str, str] | None,
                   input_options: dict, reject_folders: dict[str, str], gallery: GalleryConfig, max_pixels: int,
                   ledger: ShardLedger) -> dict:
    """``batch``: shards (``name``) of the output; ``inputs``: input shard URI by name (None: no input.uri);
    ``reject_folders``: source → the control folder of its ``_rejects/`` ("" the output's own)."""
    rows = RowBuffer()
    store = OutputStore(output_uri, output_options)
    for shard in (str(s) for s in batch["name"]):
        if not ledger.begin(shard):  # another live run is doing it (or committed it meanwhile)
            continue
        sources = [(source, store.path(folder, "_rejects", f"{shard}.jsonl") if folder else store.rejects(shard))
                   for source, folder in reject_folders.items()]
        summary, keys = build_shard(store, shard, inputs.get(shard) if inputs is not None else None,
                                    input_options if inputs is not None else None, sources,
                                    page_size=gallery.page_size, thumb_size=gallery.thumb_size,
                                    thumb_quality=gallery.thumb_quality, max_pixels=max_pixels)
        ledger.store.put_json(summary_path(ledger.store, shard),
                              {**summary, "layout": layout(gallery), "run_id": ledger.run_id})
        ledger.expect(shard, len(keys))
        if keys:
            rows.extend({"key": keys, "index": list(range(len(keys)))}, shard=shard, kind=RowKind.SAMPLE)
    return rows.batch()
