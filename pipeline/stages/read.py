"""Read stage: one input shard (or latent file, or output shard with its input) → one row per sample,
rejects included.

Each reader first claims its shard (none of its rows are read when another live run holds it),
then tells the shard ledger how many rows the shard has, which is what lets the driver commit
the shard once they are all staged.

Every member of an input tar ends up in exactly one place: the image of a SAMPLE row, the
carried metadata (``member_names``) of a SAMPLE row, or a REJECT row naming it. REJECT rows are
of two sorts, told apart by their reason:

- a whole sample (or a damaged stretch of the shard) that cannot be used; the reason names the
  sample's members, e.g. ``no image member (has 'k.json', 'k.txt')``;
- one member dropped while its sample may live on: the reason starts with ``dropped member``,
  e.g. ``dropped member 'k.pkl': extension 'pkl' not in input.carry (json, txt, cls)``. Such a
  row has its own index.

Every REJECT row carries the key it is about, raw, even an unsafe one (it is data for the reject
line, never a path), and in ``member`` the member at fault, if one is (a dropped member, an empty
image). The reader also tells the ledger each row's member (``ShardLedger.expect``), so a sample
the decode stage rejects later is named by its image member; the reject line's fields are
documented at ``pipeline.data.output_kinds.reject_line``.

All reasons are deterministic (no object addresses), so two reads of one input give the same rows.

The score job reads pairs (``read_pairs``): each committed output shard (``images/<shard>.tar``)
with the input shard of the same basename, paired by ``__key__``; both images are then decoded to
``image.size`` (pipeline/stages/images.py: decode_pairs) as translate decoded its input, so
re-scoring an output gives the numbers translate gave inline.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

from pipeline.data.filesystems import get_bytes, url_to_fs
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.data.ledger import ShardLedger
from pipeline.data.rows import (
    INPUT_COLUMNS,
    LATENT_INPUT_COLUMNS,
    SCORE_READ_COLUMNS,
    RowBuffer,
    RowKind,
)
from pipeline.data.shards import (
    DROPPED_MEMBER,
    EMPTY_IMAGE,
    INPUT_IMAGE,
    METADATA_EXTENSIONS,
    TarDamage,
    TarSample,
    clean_message,
    fetch_shard,
    image_member,
    input_images,
    iter_tar_samples,
)

MAX_REASON = 2000  # characters; a longer reason is cut, with "…" at the end


def _reject(rows: RowBuffer, members: dict[int, str], shard: str, key: str, error: str, member: str = "") -> None:
    """A REJECT row (its reason cut to MAX_REASON), and the member it is about for ShardLedger.expect."""
    if member:
        members[len(rows)] = member
    error = error if len(error) <= MAX_REASON else error[: MAX_REASON - 1] + "…"
    rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.REJECT, error=error, member=member)


def _listing(rows: RowBuffer) -> list[dict]:
    """flat_map wants a list of row dicts."""
    batch = rows.batch()
    return [{c: batch[c][i] for c in rows.columns} for i in range(len(rows))]


def _has(sample: TarSample) -> str:
    """The sample's kept members, in tar order, for a whole-sample reason."""
    return ", ".join(repr(n) for n in sample.names.values()) or "nothing"


def read_shard(item: dict, storage_options: dict, ledger: ShardLedger,
               carry: Sequence[str] | None = METADATA_EXTENSIONS) -> list[dict]:
    """All samples of one tar shard, in order. Damage becomes reject rows, never an exception.

    ``carry`` (``input.carry``) lists the metadata extensions carried through; other non-image
    members are dropped, each with a "dropped member" REJECT row. Of two image members the first
    in IMAGE_EXTENSIONS order is used and the other dropped. The shard is fetched whole (with
    retries) before parsing, so a transient storage fault is retried instead of being mistaken
    for a truncated tar.
    """
    shard, uri = item["name"], item["uri"]
    if not ledger.begin(shard):  # another live run is doing it (or committed it meanwhile): its rows are not ours
        return []
    rows = RowBuffer(INPUT_COLUMNS)
    members: dict[int, str] = {}  # row index → the member it is about (ShardLedger.expect)

    reject = functools.partial(_reject, rows, members, shard)

    def drop(key: str, name: str, reason: str) -> None:
        reject(key, f"{DROPPED_MEMBER} {name!r}: {reason}", member=name)

    data, failure = fetch_shard(uri, storage_options)
    if data is None:
        reject("", f"cannot read shard {uri}: {failure}")
    seen: set[str] = set()
    last_key = ""
    for sample in iter_tar_samples(io.BytesIO(data)) if data is not None else ():
        if isinstance(sample, Exception):
            after = f" after key {last_key!r}" if last_key else ""
            where, key, member = "", "", ""
            partial = sample.partial if isinstance(sample, TarDamage) else None
            if partial is not None:  # the group being read when the tar broke: it lost a member
                key, member = partial.key, sample.member or ""
                for name, why in partial.dropped:
                    drop(key, name, why)
                has = f" (has {_has(partial)})" if partial.names else ""
                where = f", while reading member {sample.member!r} of key {partial.key!r}{has}"
            reject(key, f"corrupt or truncated tar{after}{where}: {sample}", member=member)
            continue
        for name, why in sample.dropped:  # the raw key even when unusable: the line is joined by it
            drop(sample.key, name, why)
        if not sample.members:  # only dropped members: each has its row
            continue
        if sample.error:
            reject(sample.key, f"{sample.error} (has {_has(sample)})")
            continue
        last_key = sample.key
        if sample.key in seen:
            reject(sample.key, f"duplicate key in shard, first occurrence kept (has {_has(sample)})")
            continue
        seen.add(sample.key)
        found = image_member(sample.members)
        if found is None:
            reject(sample.key, f"no image member (has {_has(sample)})")
            continue
        ext, image = found
        if not image:
            reject(sample.key, f"{EMPTY_IMAGE} {sample.names[ext]!r} (has {_has(sample)})", member=sample.names[ext])
            continue
        carried: dict[str, bytes] = {}
        for e, b in sample.members.items():
            if e == ext:
                continue
            if e in IMAGE_EXTENSIONS:
                drop(sample.key, sample.names[e], f"second image member; the sample uses {sample.names[ext]!r}")
            elif carry is None or e in carry:
                carried[e] = b
            else:
                drop(sample.key, sample.names[e], f"extension {e!r} not in input.carry ({', '.join(carry)})")
        members[len(rows)] = sample.names[ext]  # what a decode reject of this sample is about
        rows.add(shard=shard, key=sample.key, index=len(rows), kind=RowKind.SAMPLE, image=image,
                 image_name=sample.names[ext],
                 member_names=list(carried), member_data=list(carried.values()))
    ledger.expect(shard, len(rows), members)
    return _listing(rows)


def read_latent_file(item: dict, storage_options: dict, ledger: ShardLedger) -> list[dict]:
    """One latents Parquet file → one row per sample, carrying its stacked maps as a tensor."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.data.latents import latents_from_table

    shard, uri = item["name"], item["uri"]
    if not ledger.begin(shard):
        return []
    fs, path = url_to_fs(uri, storage_options)
    rows = RowBuffer(LATENT_INPUT_COLUMNS)
    try:
        table = pq.read_table(io.BytesIO(get_bytes(fs, path)))
        for key, z in latents_from_table(table):
            rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.SAMPLE,
                     latent=z.maps.astype(np.float32), timesteps=np.asarray(z.timesteps, np.int32),
                     method=z.method, eta=z.eta, seed=z.seed, source_model=z.model,
                     source_cond=z.cond_json)
    except Exception as exc:  # noqa: BLE001
        rows.add(shard=shard, index=len(rows), kind=RowKind.REJECT,
                 error=f"cannot read latents {uri}: {type(exc).__name__}: {clean_message(str(exc))}"[:500])
    ledger.expect(shard, len(rows))
    return _listing(rows)


def _input_images(uri: str | None, shard: str, storage_options: dict) -> tuple[dict[str, tuple[str, bytes]], str]:
    """key → (member name, encoded image) of the input shard, and why a key may be missing from it.
    An empty image member is in it with its empty bytes: the reject says "empty image member", as
    read_shard's does, not that the key is missing."""
    if uri is None:
        return {}, f"no input shard {shard}.tar under input.uri"
    # unreadable: no key is in it, so every sample of the shard becomes a reject naming why
    return input_images(uri, storage_options)


def read_pairs(item: dict, storage_options: dict, input_uris: dict[str, str] | None, input_storage_options: dict,
               ledger: ShardLedger) -> list[dict]:
    """One committed output shard (``item``: its images tar) → one row per sample: the output image,
    and with ``input_uris`` (directional CLIP) the input image of the same key from the input shard
    of the same basename. A sample without its input image is a REJECT naming the key and the shard."""
    shard, uri = item["name"], item["uri"]
    if not ledger.begin(shard):  # another live score run is doing it (or committed it meanwhile)
        return []
    rows = RowBuffer(SCORE_READ_COLUMNS)
    members: dict[int, str] = {}  # row index → the member it is about (ShardLedger.expect) …
    input_members: dict[int, str] = {}  # … and a pair's input image member, for a reject of that image

    reject = functools.partial(_reject, rows, members, shard)

    inputs, missing = (None, "") if input_uris is None else _input_images(input_uris.get(shard), shard,
                                                                          input_storage_options)
    data, failure = fetch_shard(uri, storage_options)
    if data is None:
        reject("", f"cannot read output shard {uri}: {failure}")
    seen: set[str] = set()
    for sample in iter_tar_samples(io.BytesIO(data)) if data is not None else ():
        if isinstance(sample, Exception):
            partial = sample.partial if isinstance(sample, TarDamage) else None
            key, member = (partial.key, sample.member or "") if partial is not None else ("", "")
            reject(key, f"corrupt or truncated output shard {uri}: {sample}", member=member)
            continue
        if sample.error or not sample.members:  # the raw key, even an unsafe one: the line is joined by it
            lone = sample.dropped[0][0] if len(sample.dropped) == 1 and not sample.members else ""
            reject(sample.key, f"output shard {uri}: {sample.error or 'a group with no usable member'}", member=lone)
            continue
        if sample.key in seen:
            reject(sample.key, f"duplicate key in output shard {uri}, first occurrence scored")
            continue
        seen.add(sample.key)
        found = image_member(sample.members)
        if found is None:
            reject(sample.key, f"no image member in output shard {uri} (key {sample.key!r})")
            continue
        name = sample.names[found[0]]
        if not found[1]:
            reject(sample.key, f"{EMPTY_IMAGE} {name!r} in output shard {uri} (key {sample.key!r})", member=name)
            continue
        row = {"shard": shard, "key": sample.key, "index": len(rows), "kind": RowKind.SAMPLE, "image": found[1],
               "image_name": name}
        if inputs is not None:
            if sample.key not in inputs:
                reject(sample.key, f"{INPUT_IMAGE} missing: key {sample.key!r} of shard {shard!r} is {missing}")
                continue
            input_name, input_image = inputs[sample.key]
            if not input_image:
                reject(sample.key, f"{EMPTY_IMAGE} {input_name!r} in input shard {input_uris[shard]} "
                                   f"(key {sample.key!r})", member=input_name)
                continue
            row["input_image"] = input_image
            input_members[len(rows)] = input_name
        members[len(rows)] = name  # what a decode reject of the pair is about (the input's: input_members)
        rows.add(**row)
    ledger.expect(shard, len(rows), members, input_members)
    return _listing(rows)


def read_image_files(item: dict, storage_options: dict, ledger: ShardLedger) -> list[dict]:
    """One unit of loose image files (``pipeline.data.shards.list_image_units``) → a SAMPLE row per file,
    keyed by its path under the unit's folder less the extension; a file that cannot be read or is empty
    → a REJECT row naming it. Claimed and counted for the ledger as ``read_shard`` does."""
    import posixpath

    shard = item["name"]
    if not ledger.begin(shard):
        return []
    rows = RowBuffer(INPUT_COLUMNS)
    members: dict[int, str] = {}
    root = item["uri"].rstrip("/") + "/"
    for uri in item["files"]:
        name = uri[len(root):] if uri.startswith(root) else posixpath.basename(uri)
        key = posixpath.splitext(name)[0]
        data, failure = fetch_shard(uri, storage_options)
        if data is None:
            _reject(rows, members, shard, key, f"cannot read image file {uri}: {failure}", member=name)
        elif not data:
            _reject(rows, members, shard, key, f"{EMPTY_IMAGE} {name!r}", member=name)
        else:
            members[len(rows)] = name
            rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.SAMPLE, image=data, image_name=name)
    ledger.expect(shard, len(rows), members)
    return _listing(rows)
