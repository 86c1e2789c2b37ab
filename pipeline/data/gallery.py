"""One shard's gallery (`latentshift gallery`, docs/gallery.md): read what a run committed of the shard, make
the thumbnails, write the shard's pages (``pipeline/data/gallery_pages.py`` renders them); and the front page.

Read, for a shard S of an output:

  images/S.tar         the samples in their order: the image, the further image members a job wrote
                       (an edit's ``scale1.png`` …, a search's ``top2.png`` …), ``latentshift.json`` (the
                       provenance), the carried text members
  <input.uri>/S.tar    with input.uri, the input image of each key (paired by ``__key__``, read as the score
                       job reads them: pipeline/data/shards.py ``input_images``)
  scores/S.parquet     where it exists: the CLIP score and directional CLIP of each key (rank 0)
  rejects              the job's ``_rejects/S.jsonl`` and the score job's ``_score/_rejects/S.jsonl``

Written under ``gallery/<S>/``: ``thumbs/<index>.webp`` (the output), ``<index>.in.webp`` (its input),
``<index>.<n>.webp`` (its n-th further image) — named by the sample's position, never by its key, which
is the user's data — then the grid pages, ``gallery.page_size`` samples each: the shard in input order,
and again in the order of each score it has, lowest and highest first (``by-<score>-asc.html`` …: only
the HTML again, the same thumbnails); and the reject pages. A shard done again starts from an empty
folder, so no page of an earlier, longer shard is left behind.

``gallery/index.html`` (``write_index``) lists the shards, ``INDEX_ROWS`` a page (index-2.html …).
"""

from __future__ import annotations

import io
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

from pipeline.data.gallery_pages import (
    INDEX_ROWS,
    Card,
    Picture,
    grid_page,
    in_order,
    index_page,
    link,
    orders,
    page_count,
    page_file,
    rejects_page,
    shard_folder,
    shard_scores,
)
from pipeline.data.images import IMAGE_EXTENSIONS, RejectedImage, decode_image
from pipeline.data.output_kinds import PROVENANCE_MEMBER
from pipeline.data.outputs import OutputStore
from pipeline.data.run_metrics import PSNR_OF_IDENTICAL
from pipeline.data.shards import image_member, input_images, iter_tar_samples

FOLDER = "gallery"  # under output.uri
TEXT_MEMBERS = ("txt", "cls", "json")  # carried members a card shows as text
MAX_TEXT = 2000  # characters of a text member shown; a longer one is cut, with "…"
# what a sample's provenance records of itself, not of the run: left out of the run's settings
PER_SAMPLE = frozenset({"key", "source_shard", "timesteps", "sample_seed", "latent_rows", "candidate", "chosen",
                        "ranked", "psnr", "ssim", "clip_score", "directional"})
_ABSENT = object()
WRITERS = 8  # thumbnails and pages written at once (object stores: one PUT each)


# ---- reading ---------------------------------------------------------------------------------------


def read_input_images(uri: str | None, storage_options: dict) -> tuple[dict[str, bytes], str]:
    """key → encoded input image of the input shard (the first of a key), and why a key may be missing."""
    if uri is None:
        return {}, "no input shard of this name under input.uri"
    found, why = input_images(uri, storage_options)  # unreadable: every card says why
    return {key: image for key, (_, image) in found.items()}, why


def read_scores(store: OutputStore, shard: str) -> dict[str, dict[str, float]]:
    """key → its rank-0 ``clip_score`` and ``directional`` of ``scores/<shard>.parquet``, those measured."""
    import pyarrow.parquet as pq

    path = store.scores(shard)
    if not store.exists(path):
        return {}
    table = pq.read_table(io.BytesIO(store.get(path)), columns=["key", "rank", "clip_score", "directional"])
    out: dict[str, dict[str, float]] = {}
    for key, rank, clip, directional in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        if rank != 0:
            continue
        measured = {n: float(v) for n, v in (("clip_score", clip), ("directional", directional))
                    if v is not None and not math.isnan(v)}
        out.setdefault(key, {}).update(measured)
    return out


def read_rejects(store: OutputStore, sources: list[tuple[str, str]]) -> dict[str, list[dict]]:
    """source → the lines of its rejects file (``_rejects/<shard>.jsonl`` …), where it exists."""
    out = {}
    for source, path in sources:
        if store.exists(path):
            lines = store.get(path).decode("utf-8", "replace").splitlines()
            out[source] = [{**_line(text), "source": source} for text in lines if text.strip()]
    return out


def _line(text: str) -> dict:
    try:
        line = json.loads(text)
    except ValueError:
        return {"reason": text}
    return line if isinstance(line, dict) else {"reason": text}


# ---- one sample ------------------------------------------------------------------------------------


def thumbnail(data: bytes, size: int, quality: int, max_pixels: int) -> tuple[bytes, int, int]:
    """An encoded image → WebP bytes of ``quality``, its longest side at most ``size`` (never enlarged)."""
    from PIL import Image

    im = Image.fromarray(decode_image(data, None, max_pixels=max_pixels))
    im.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue(), im.width, im.height


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def further_images(members: dict[str, bytes]) -> list[str]:
    """The sample's image members besides its image (``scale1.png``, ``top2.png``), in natural order."""
    return sorted((e for e in members if "." in e and e.rsplit(".", 1)[1] in IMAGE_EXTENSIONS), key=_natural)


def shared_settings(shard: str, samples: list[tuple[str, dict[str, bytes]]]) -> tuple[dict | None, str]:
    """The run's settings as the shard's first sample with a provenance record records them (its record
    less what it records of itself, ``PER_SAMPLE``), and ``<shard>/<key>`` of that sample."""
    for key, members in samples:
        prov = provenance_of(members)
        if isinstance(prov, dict):
            return {k: v for k, v in prov.items() if k not in PER_SAMPLE}, f"{shard}/{key}"
    return None, ""


def provenance_of(members: dict[str, bytes]) -> object:
    data = members.get(PROVENANCE_MEMBER)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


def scores_of(provenance: object, scored: dict[str, float]) -> dict[str, float]:
    """The sample's measures: CLIP scores from scores/ (else from its provenance, translate with
    score.inline), PSNR/SSIM from its provenance (identical images, a null PSNR: PSNR_OF_IDENTICAL dB,
    as the run's mean counts them)."""
    out: dict[str, float] = {}
    if isinstance(provenance, dict):
        for name in ("clip_score", "directional"):
            if isinstance(provenance.get(name), (int, float)):
                out[name] = float(provenance[name])
        if isinstance(provenance.get("ssim"), (int, float)):
            psnr = provenance.get("psnr")
            out["psnr"] = float(psnr) if isinstance(psnr, (int, float)) else PSNR_OF_IDENTICAL
            out["ssim"] = float(provenance["ssim"])
    out.update(scored)
    return out


def _cut(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


class _Thumbs:
    """A page's thumbnails: made on the way, written together."""

    def __init__(self, size: int, quality: int, max_pixels: int):
        self.size, self.quality, self.max_pixels = size, quality, max_pixels
        self.files: dict[str, bytes] = {}

    def picture(self, label: str, data: bytes | None, name: str, missing: str) -> Picture:
        if data is None:
            return Picture(label, note=missing)
        if not data:
            return Picture(label, note="empty image member")
        try:
            webp, w, h = thumbnail(data, self.size, self.quality, self.max_pixels)
        except RejectedImage as exc:
            return Picture(label, note=str(exc))
        self.files[name] = webp
        return Picture(label, src=link("thumbs", name), width=w, height=h)


def make_card(thumbs: _Thumbs, index: int, key: str, members: dict[str, bytes],
              given: tuple[bytes | None, str] | None, scored: dict[str, float], settings: dict | None) -> Card:
    """One sample's card: its input (``given``: its input image, or None and why; None: no input column),
    output and further images as thumbnails, its measures, its provenance less the shard's ``settings``."""
    prov = provenance_of(members)
    pictures = []
    if given is not None:
        pictures.append(thumbs.picture("input", given[0], f"{index:06d}.in.webp", given[1]))
    found = image_member(members)
    pictures.append(thumbs.picture("output", found[1] if found else None, f"{index:06d}.webp", "no image member"))
    scales = prov.get("scale_members", {}) if isinstance(prov, dict) else {}  # an edit's: member → its scale
    for n, ext in enumerate(further_images(members), start=1):
        label = ext.rsplit(".", 1)[0] + (f" (scale {scales[ext]})" if ext in scales else "")
        pictures.append(thumbs.picture(label, members[ext], f"{index:06d}.{n}.webp", ""))
    own = ({k: v for k, v in prov.items() if k in PER_SAMPLE or (settings or {}).get(k, _ABSENT) != v}
           if isinstance(prov, dict) else prov)
    return Card(index, key, pictures, scores_of(prov, scored), own,
                {e: _cut(members[e]) for e in TEXT_MEMBERS if e in members})


# ---- one shard ---------------------------------------------------------------------------------------


def read_samples(store: OutputStore, shard: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[dict]]:
    """The samples of ``images/<shard>.tar`` in order, (key, members); and what cannot be shown (a damaged
    tar, an unusable or repeated key) as reject lines. No tar: every sample of the shard was rejected."""
    samples, problems = [], []
    images = store.images(shard)
    if not store.exists(images):
        return samples, problems
    seen: set[str] = set()
    for sample in iter_tar_samples(io.BytesIO(store.get(images))):
        if isinstance(sample, Exception):
            problems.append({"key": "", "reason": f"damaged output shard: {sample}"})
            continue
        if sample.error or not sample.members or sample.key in seen:
            why = sample.error or ("duplicate key" if sample.key in seen else "no usable member")
            problems.append({"key": sample.key, "reason": f"not shown: {why}"})
            continue
        seen.add(sample.key)
        samples.append((sample.key, sample.members))
    return samples, problems




def build_shard(store: OutputStore, shard: str, input_uri: str | None, input_options: dict | None,
                reject_sources: list[tuple[str, str]], *, page_size: int, thumb_size: int, thumb_quality: int,
                max_pixels: int) -> tuple[dict, list[str]]:
    """Write ``gallery/<shard>/`` (see the module's docstring); return the shard's summary for the front
    page (samples, pages, rejects by source, mean scores, the run's settings as its first sample records
    them) and the keys of the samples shown, in order.

    ``store``: the output (its root); ``input_options``: None without input.uri (no input column), else
    the input's storage options, ``input_uri`` its shard of this name (None: there is none);
    ``reject_sources``: (source, path) of the rejects files shown; ``page_size`` samples (or reject lines)
    a page, thumbnails at most ``thumb_size`` pixels a side, of WebP quality ``thumb_quality``.
    """
    folder = shard_folder(shard)
    base = store.path(FOLDER, folder)
    store.remove_tree(base)  # a shard done again: no page or thumbnail of the earlier one stays
    paired = input_options is not None
    inputs, missing_input = read_input_images(input_uri, input_options or {}) if paired else ({}, "")
    scored = read_scores(store, shard)
    rejects = read_rejects(store, reject_sources)
    samples, problems = read_samples(store, shard)
    pages = page_count(len(samples), page_size)
    lines = [line for source in rejects.values() for line in source]
    lines += [{**p, "source": "gallery", "index": ""} for p in problems]
    reject_pages = page_count(len(lines), page_size) if lines else 0
    settings, settings_from = shared_settings(shard, samples)
    cards: list[Card] = []
    with ThreadPoolExecutor(WRITERS) as pool:
        def write(files: dict[str, bytes]) -> None:
            list(pool.map(lambda item: store.put(store.path(FOLDER, folder, *item[0].split("/")), item[1]),
                          files.items()))

        for page in range(1, pages + 1):  # the thumbnails, a page's at a time
            thumbs = _Thumbs(thumb_size, thumb_quality, max_pixels)
            for index in range((page - 1) * page_size, min(len(samples), page * page_size)):
                key, members = samples[index]
                given = (inputs.get(key), missing_input) if paired else None
                cards.append(make_card(thumbs, index, key, members, given, scored.get(key, {}), settings))
            write({f"thumbs/{name}": data for name, data in thumbs.files.items()})
        scores = shard_scores(cards)
        for order in orders(scores):  # the grid pages: the whole shard in each order, WRITERS pages at once
            arranged, files = in_order(cards, order), {}
            for page in range(1, pages + 1):
                start = (page - 1) * page_size
                files[page_file(page, order.stem)] = grid_page(
                    shard, arranged[start: start + page_size], page, pages, len(samples), len(lines), settings,
                    scores=scores, order=order, start=start).encode()
                if len(files) == WRITERS or page == pages:
                    write(files)
                    files = {}
        for page in range(1, reject_pages + 1):
            chunk = lines[(page - 1) * page_size: page * page_size]
            write({page_file(page, "rejects"): rejects_page(shard, chunk, page, reject_pages, len(lines)).encode()})

    clip = [s["clip_score"] for s in scored.values() if "clip_score" in s]
    directional = [s["directional"] for s in scored.values() if "directional" in s]
    return {"shard": shard, "folder": folder, "samples": len(samples), "pages": pages,
            "rejects": {source: len(v) for source, v in rejects.items()}, "problems": len(problems),
            "reject_pages": reject_pages,
            "paired": sum(1 for key, _ in samples if key in inputs) if paired else None,
            "orders": [o.stem for o in orders(scores)],
            "scored": len(clip), "mean_clip_score": round(sum(clip) / len(clip), 4) if clip else None,
            "mean_directional": round(sum(directional) / len(directional), 4) if directional else None,
            "settings": settings, "settings_from": settings_from}, [key for key, _ in samples]


# ---- the front page ----------------------------------------------------------------------------------


def write_index(store: OutputStore, output: str, shards: list[dict], run_record: dict | None,
                per_page: int = INDEX_ROWS) -> str:
    """``gallery/index.html`` (and index-2.html … : ``per_page`` shards a page) from the shards' summaries
    (``build_shard``; ``{"shard": …, "missing": True}`` for a shard not shown yet), the run's settings from
    the first shard that has them; the pages of an earlier, longer index removed. Returns the first's path."""
    first = next((s for s in shards if s.get("settings")), None)
    pages = page_count(len(shards), per_page)
    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(lambda page: store.put(store.path(FOLDER, page_file(page, "index")), index_page(
            output, shards, first["settings"] if first else None, first["settings_from"] if first else "",
            run_record, page, per_page).encode()), range(1, pages + 1)))
    stale = pages + 1  # an earlier index's pages were index-2.html … index-<n>.html, with no gap
    while store.exists(store.path(FOLDER, page_file(stale, "index"))):
        store.remove(store.path(FOLDER, page_file(stale, "index")))
        stale += 1
    return store.path(FOLDER, page_file(1, "index"))


def summary_path(control: OutputStore, shard: str) -> str:
    """Where a shard's summary (``build_shard``) is kept for the front page: beside the gallery's ledger."""
    return control.ctl("shards", f"{shard}.json")
