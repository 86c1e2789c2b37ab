"""WebDataset shards: list them, read them tolerantly, pack image folders into them.

A sample is ``__key__`` + one image member (jpg/jpeg/png/webp) + optional metadata members
(by default json/txt/cls: ``input.carry``), carried through unchanged. Reading never fails a
run: a corrupt or truncated tar yields the samples before the damage plus a ``TarDamage``
saying what went wrong and which member was being read.

Nothing in a tar is lost silently: ``iter_tar_samples`` puts every member either in its
sample's ``members`` or in its ``dropped`` list with a reason (non-regular members, names
without an extension, repeated names), and marks samples whose key is unsafe as an output path
(``key_problem``). The read stage (pipeline/stages/read.py) turns each drop into a REJECT row
whose reason starts with "dropped member".
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from braceexpand import braceexpand

from pipeline.data.filesystems import explain_storage_error, get_bytes, url_to_fs
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.errors import StorageError

METADATA_EXTENSIONS = ("json", "txt", "cls")


@dataclass(frozen=True)
class ShardRef:
    uri: str  # full URI as given to fsspec (protocol kept)
    name: str  # basename without .tar: the unit of output naming and of the ledger
    files: tuple[str, ...] = ()  # a unit of loose image files (``list_image_units``): their URIs; () for a tar


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


def list_image_units(uri: str | list[str], storage_options: dict | None = None,
                     per_unit: int = 1000) -> list[ShardRef]:
    """The units of a set of images: its tar shards if it has any, else its image files (any depth,
    sorted) in units of ``per_unit``, named ``files-00000`` …: a folder of photographs is read as it is.
    None of either: one line naming the URI."""
    shards = list_shards(uri, storage_options)
    if shards:
        return shards
    files = list_image_files(uri, storage_options)
    if not files:
        shown = uri if isinstance(uri, str) else ", ".join(uri)
        raise StorageError(f"{shown}: no .tar shards and no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    root = uri if isinstance(uri, str) else uri[0]
    return [ShardRef(root, f"files-{i // per_unit:05d}", tuple(files[i:i + per_unit]))
            for i in range(0, len(files), per_unit)]


def list_image_files(uri: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Image files under a prefix (or listed), sorted, as full URIs."""
    out: list[str] = []
    for pattern in uri if isinstance(uri, list) else [uri]:
        for one in braceexpand(pattern):
            fs, path = url_to_fs(one, storage_options)
            prefix = _protocol_prefix(one) if "://" in one and not one.startswith("file://") else ""
            try:
                found = [path] if fs.isfile(path) else fs.find(path)
            except Exception as exc:  # noqa: BLE001 - one clear line
                raise explain_storage_error(one, exc) from None
            out += [prefix + p for p in found if posixpath.splitext(p)[1].lower().lstrip(".") in IMAGE_EXTENSIONS]
    return sorted(set(out))


def listing_signature(uri: str | list[str], storage_options: dict | None = None) -> str:
    """A digest of what is under ``uri`` (every tar and image file: path, size, version tag): equal while
    nothing was added, removed or rewritten."""
    import hashlib
    import json

    entries = []
    for pattern in uri if isinstance(uri, list) else [uri]:
        for one in braceexpand(pattern):
            fs, path = url_to_fs(one, storage_options)
            try:
                found = {path: fs.info(path)} if fs.isfile(path) else fs.find(path, detail=True)
            except Exception as exc:  # noqa: BLE001
                raise explain_storage_error(one, exc) from None
            for p, info in found.items():
                ext = posixpath.splitext(p)[1].lower().lstrip(".")
                if ext == "tar" or ext in IMAGE_EXTENSIONS:
                    version = next((str(info[k]) for k in ("ETag", "etag", "VersionId", "mtime", "LastModified")
                                    if info.get(k) not in (None, "")), "")
                    entries.append([p, int(info.get("size") or 0), version])
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


@dataclass
class TarSample:
    """One group of consecutive tar members sharing a key.

    ``members`` holds the regular members kept, extension → bytes (the first of two members
    with the same extension), ``names`` their names in the tar, in tar order. ``dropped`` lists
    the members of the group that are *not* in ``members``, each with the reason, so that every
    member of a tar is in exactly one of the two. ``error`` is set when the key itself cannot be
    used (unsafe or reserved): a reader must reject the whole sample and never use ``key`` as a
    path. A group may have no kept members at all (only dropped ones).
    """

    key: str
    members: dict[str, bytes]  # extension → bytes
    names: dict[str, str] = field(default_factory=dict)  # extension → member name in the tar
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (member name, reason), tar order
    error: str = ""  # a whole-sample problem: "unsafe key …" / "reserved key …"; "" when usable


class TarDamage(Exception):
    """Why a tar stopped being readable: yielded (never raised) by ``iter_tar_samples``.

    ``str()`` is ``"<ExceptionType>: <message>"`` without memory addresses, so it is a
    deterministic reason. ``member`` is the member whose data was being read when the tar broke
    (None when it broke between members, in a header); ``partial`` is then that member's group,
    which is not yielded as a sample (it lost a member): its kept members and drops are in it.
    """

    def __init__(self, cause: BaseException, member: str | None = None, partial: TarSample | None = None):
        self.cause_type = type(cause).__name__
        self.detail = clean_message(str(cause))
        self.member = member
        self.partial = partial
        super().__init__(f"{self.cause_type}: {self.detail}")


DROPPED_MEMBER = "dropped member"  # how a reject reason for one member (not its sample) begins
EMPTY_IMAGE = "empty image member"  # how the reason for a 0-byte image begins, in every job
INPUT_IMAGE = "input image"  # how the score job's reason about the input (not the output) image begins

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_message(text: str) -> str:
    """An exception message made deterministic: object addresses (`` at 0x7f…``) removed."""
    return _ADDRESS.sub("", text)


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.def.png' → ('dir/abc', 'def.png'): key is up to the first dot of the basename.

    A name without an extension ('abc', 'dir/abc', 'abc.') gives (its key, '').
    """
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def key_problem(key: str) -> str:
    """Why ``key`` cannot name output members ("" when it can).

    A key is safe if it is a relative POSIX path with no ``..``, ``.`` or empty parts, no
    leading ``/``, no backslash, no control characters, valid UTF-8 and at most 255 bytes per
    part. Keys starting with ``__`` are reserved (webdataset's ``__key__`` and friends).
    """
    why = ""
    path = key[2:] if key.startswith("./") else key  # `tar -cf x.tar .` names members ./k.png: safe
    if not path:
        why = "empty"
    elif any(c < " " or "\x7f" <= c <= "\x9f" for c in key):
        why = "control character"
    elif "\\" in key:
        why = "backslash"
    elif path.startswith("/"):
        why = "absolute path"
    elif ".." in path.split("/"):
        why = "path traversal"
    elif any(p in ("", ".") for p in path.split("/")):
        why = "empty or '.' path part"
    else:
        try:
            parts = [p.encode("utf-8") for p in path.split("/")]
        except UnicodeEncodeError:
            why = "not valid UTF-8"
        else:
            if any(len(p) > 255 for p in parts):
                why = "path part longer than 255 bytes"
    if why:
        return f"unsafe key {key!r}: {why}"
    if key.startswith("__"):
        return f"reserved key {key!r}: keys starting with '__' are reserved"
    return ""


_MEMBER_TYPES = {tarfile.DIRTYPE: "directory", tarfile.CHRTYPE: "character device",
                 tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def _not_regular(info: tarfile.TarInfo) -> str:
    if info.issym():
        what = f"symbolic link to {info.linkname!r}"
    elif info.islnk():
        what = f"hard link to {info.linkname!r}"
    else:
        what = _MEMBER_TYPES.get(info.type, f"member of tar type {info.type!r}")
    return f"{what}, not a regular file"


class _StrictTarInfo(tarfile.TarInfo):
    """A damaged header after the first is an error, not a silent end of the archive.

    (tarfile ends a stream quietly at a truncated or invalid header past offset 0.)
    """

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            raise tarfile.ReadError(f"damaged member header ({exc})") from None


def iter_tar_samples(stream) -> Iterator[TarSample | TarDamage]:
    """Group consecutive tar members by key into samples. On damage, yield a TarDamage and stop.

    Every member ends up either in a sample's ``members`` or in its ``dropped`` list: non-regular
    members (symlinks, directories, …), members without an extension, and a second member with
    the same extension (the first is kept) are dropped with a reason. Extensions are lower-cased.
    Keys are checked (``key_problem``); a sample with an unusable key has ``error`` set.
    Callers that only want usable samples skip those with ``error`` (or no ``members``).
    """
    current: TarSample | None = None
    reading: str | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for info in tar:
                key, ext = split_member_name(info.name)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key, {}, error=key_problem(key))
                if not info.isfile():
                    current.dropped.append((info.name, _not_regular(info)))
                    continue
                reading = info.name
                data = tar.extractfile(info).read()
                reading = None
                if not ext:
                    current.dropped.append((info.name, "no extension"))
                elif ext in current.members:
                    current.dropped.append(
                        (info.name, f"duplicate member: extension {ext!r} was already read from "
                                    f"{current.names[ext]!r}, which is kept"))
                else:
                    current.members[ext] = data
                    current.names[ext] = info.name
    except Exception as exc:  # noqa: BLE001 - damaged input is data, not a crash
        if reading is None:  # broke between members: the group so far is whole as far as we know
            if current is not None:
                yield current
            yield TarDamage(exc)
        else:
            yield TarDamage(exc, reading, current)
        return
    if current is not None:
        yield current


def image_member(members: dict[str, bytes]) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext, members[ext]
    return None


def fetch_shard(uri: str, storage_options: dict) -> tuple[bytes | None, str]:
    """A whole shard's bytes (fetched with retries, so a transient fault is not taken for a truncated
    tar), or None and why not ("<error type>: <message>", credentials scrubbed) for a reject line."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        return get_bytes(fs, path), ""
    except Exception as exc:  # noqa: BLE001 - the caller records it, the run goes on
        return None, f"{type(exc).__name__}: {clean_message(str(exc))}"


def input_images(uri: str, storage_options: dict) -> tuple[dict[str, tuple[str, bytes]], str]:
    """key → (member name, encoded image) of an input shard, and why a key may be missing from it. A key's
    first sample with an image counts, as the read stage keeps it; an empty image member is in it with its
    empty bytes (the caller says "empty image member", not that the key is missing). The samples before
    damage to the tar are kept. Used by the score job's reader (pipeline/stages/read.py ``read_pairs``) and
    the gallery (pipeline/data/gallery.py), which pair an output with its input by ``__key__``."""
    data, failure = fetch_shard(uri, storage_options)
    if data is None:
        return {}, f"cannot read input shard {uri}: {failure}"
    found: dict[str, tuple[str, bytes]] = {}
    why = f"not in input shard {uri}"
    for sample in iter_tar_samples(io.BytesIO(data)):
        if isinstance(sample, Exception):
            why = f"not in input shard {uri} (it is damaged: {clean_message(str(sample))})"
            break
        image = image_member(sample.members) if not sample.error else None
        if image is not None and sample.key not in found:
            found[sample.key] = (sample.names[image[0]], image[1])
    return found, why


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
                damage = str(item)  # TarDamage: "<type>: <message>", deterministic
            elif not item.error and image_member(item.members):
                n += 1
    return n, damage

