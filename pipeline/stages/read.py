"""Read stage: one input shard (or latent file) → one row per sample, rejects included.

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
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from pipeline.data.filesystems import get_bytes, url_to_fs
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.data.ledger import ShardLedger
from pipeline.data.rows import INPUT_COLUMNS, LATENT_INPUT_COLUMNS, RowBuffer, RowKind
from pipeline.data.shards import (
    DROPPED_MEMBER,
    EMPTY_IMAGE,
    METADATA_EXTENSIONS,
    TarDamage,
    TarSample,
    clean_message,
    image_member,
    iter_tar_samples,
)

MAX_REASON = 2000  # characters; a longer reason is cut, with "…" at the end


def _listing(rows: RowBuffer) -> list[dict]:
    """flat_map wants a list of row dicts."""
    batch = rows.batch()
    return [{c: batch[c][i] for c in rows.columns} for i in range(len(rows))]


def _has(sample: TarSample) -> str:
    """The sample's kept members, in tar order, for a whole-sample reason."""
    return ", ".join(repr(n) for n in sample.names.values()) or "nothing"


def fetch_shard(uri: str, storage_options: dict) -> tuple[bytes | None, str]:
    """A whole shard's bytes (fetched with retries, so a transient fault is not taken for a truncated
    tar), or None and why not ("<error type>: <message>", credentials scrubbed) for a reject line."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        return get_bytes(fs, path), ""
    except Exception as exc:  # noqa: BLE001 - the caller records it, the run goes on
        return None, f"{type(exc).__name__}: {clean_message(str(exc))}"


def read_shard(item: dict, storage_options: dict, ledger: ShardLedger,
               carry: Sequence[str] = METADATA_EXTENSIONS) -> list[dict]:
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
    carry = tuple(carry)
    rows = RowBuffer(INPUT_COLUMNS)
    members: dict[int, str] = {}  # row index → the member it is about (ShardLedger.expect)

    def reject(key: str, error: str, member: str = "") -> None:
        if len(error) > MAX_REASON:
            error = error[: MAX_REASON - 1] + "…"
        if member:
            members[len(rows)] = member
        rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.REJECT, error=error, member=member)

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
            elif e in carry:
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
