"""WebDataset shards: list them, read them tolerantly, pack image folders into them.

A sample is ``__key__`` + one image member (jpg/jpeg/png/webp) + optional metadata members
(json/txt/cls), carried through unchanged. Reading never fails a run: a corrupt or truncated
tar yields the samples before the damage plus a reject row saying what went wrong.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from braceexpand import braceexpand

from pipeline.data.filesystems import explain_storage_error, url_to_fs
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import StorageError

METADATA_EXTENSIONS = ("json", "txt", "cls")


@dataclass(frozen=True)
class ShardRef:
    uri: str  # full URI as given to fsspec (protocol kept)
    name: str  # basename without .tar: the unit of output naming and of the ledger


def _protocol_prefix(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def list_shards(uri: str | list[str], storage_options: dict | None = None) -> list[ShardRef]:
    """Shards under a prefix, matching a brace pattern, or listed; non-tar objects ignored.

    Raises StorageError (naming the URI and the fix) for missing buckets or credentials.
    """
    uris = uri if isinstance(uri, list) else [uri]
    found: dict[str, ShardRef] = {}
    for pattern in uris:
        for one in braceexpand(pattern):
            fs, path = url_to_fs(one, storage_options)
            prefix = _protocol_prefix(one) if "://" in one and not one.startswith("file://") else ""
            try:
                if path.endswith(".tar"):
                    if not fs.exists(path):
                        raise FileNotFoundError(path)
                    paths = [path]
                else:
                    paths = [p for p in fs.find(path) if p.endswith(".tar")]
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - one clear line
                raise explain_storage_error(one, exc) from None
            for p in paths:
                full = prefix + p
                name = posixpath.basename(p)[: -len(".tar")]
                if name in found and found[name].uri != full:
                    raise StorageError(
                        f"two input shards share the basename {name!r} ({found[name].uri}, {full}); "
                        "outputs are named by basename, so rename one"
                    )
                found[name] = ShardRef(full, name)
    return sorted(found.values(), key=lambda s: s.name)


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]  # extension → bytes


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.def.png' → ('dir/abc', 'def.png'): key is up to the first dot of the basename."""
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def iter_tar_samples(stream) -> Iterator[TarSample | Exception]:
    """Group consecutive tar members into samples. On damage, yield the exception and stop."""
    current: TarSample | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key.startswith("__") or not ext:
                    continue
                data = tar.extractfile(info).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key, {})
                current.members[ext] = data
    except Exception as exc:  # noqa: BLE001 - damaged input is data, not a crash
        if current is not None:
            yield current
            current = None
        yield exc
    if current is not None:
        yield current


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext, members[ext]
    return None


def write_samples(fileobj, samples) -> int:
    """Write (key, {ext: bytes}) samples with webdataset, deterministic headers (mtime 0)."""
    import webdataset as wds

    n = 0
    with wds.TarWriter(fileobj, encoder=False, mtime=0.0) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})
            n += 1
    return n


def pack_folder(src: str, dst: str, per_shard: int = 1000, storage_options: dict | None = None,
                prefix: str = "shard") -> list[str]:
    """Pack image files under ``src`` into ``dst/<prefix>-NNNNNN.tar`` with stable keys.

    Keys are the files' paths relative to ``src`` without extension ('/' → '_'), sorted, so
    packing the same folder twice gives the same keys. Sidecar files with the same stem and
    a metadata extension (json/txt/cls) travel with their image.
    """
    sfs, spath = url_to_fs(src, storage_options)
    dfs, dpath = url_to_fs(dst, storage_options)
    try:
        files = sorted(sfs.find(spath))
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(src, exc) from None
    groups: dict[str, dict[str, str]] = {}
    for f in files:
        rel = posixpath.relpath(f, spath)
        stem, ext = os.path.splitext(rel)
        ext = ext.lstrip(".").lower()
        if ext in IMAGE_EXTENSIONS or ext in METADATA_EXTENSIONS:
            groups.setdefault(stem, {})[ext] = f
    keyed = [(stem.replace("/", "_").replace(".", "_"), m) for stem, m in sorted(groups.items())
             if any(e in IMAGE_EXTENSIONS for e in m)]
    written = []
    dfs.makedirs(dpath, exist_ok=True)
    for n in range(0, len(keyed), per_shard):
        name = f"{dpath.rstrip('/')}/{prefix}-{n // per_shard:06d}.tar"
        buf = io.BytesIO()
        chunk = keyed[n : n + per_shard]
        write_samples(buf, ((key, {ext: sfs.cat_file(p) for ext, p in m.items()}) for key, m in chunk))
        dfs.pipe_file(name, buf.getvalue())
        written.append(_protocol_prefix(dst) + name if "://" in dst else name)
    return written


def count_samples(ref: ShardRef, storage_options: dict | None = None) -> tuple[int, str | None]:
    """(number of samples with an image, damage message or None)."""
    fs, path = url_to_fs(ref.uri, storage_options)
    n, damage = 0, None
    with fs.open(path, "rb") as f:
        for item in iter_tar_samples(f):
            if isinstance(item, Exception):
                damage = f"{type(item).__name__}: {item}"
            elif image_member(item.members):
                n += 1
    return n, damage

