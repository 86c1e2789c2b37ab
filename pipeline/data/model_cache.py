"""Local copies of model folders that live in object storage.

A remote folder is copied once per (URI, object versions) into a cache directory; every
actor on a node then loads the same local copy. Copies are made under a file lock into a
temporary folder and renamed into place, so actors that start together neither race nor
see a half-written folder, and a changed object upstream yields a new cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from filelock import FileLock

from pipeline.data.filesystems import explain_storage_error, url_to_fs
from pipeline.errors import ModelLoadError, StorageError

COMPLETE_MARKER = ".latentshift-complete"


def default_cache_dir() -> Path:
    root = os.environ.get("LATENTSHIFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "latentshift"
    )
    return Path(root) / "models"


def _version_of(info: dict) -> str:
    """The most specific version tag storage gives: VersionId, then ETag, then mtime."""
    for k in ("VersionId", "version_id", "ETag", "etag", "generation", "md5Hash", "LastModified", "mtime", "updated"):
        if info.get(k) not in (None, ""):
            return str(info[k])
    return ""


def materialize(uri: str, storage_options: dict | None = None, cache_dir: Path | None = None) -> Path:
    """Copy the folder at ``uri`` into the local cache (once) and return the local path."""
    fs, root = url_to_fs(uri, storage_options)
    root = root.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except Exception as exc:  # noqa: BLE001 - mapped to one clear line
        raise explain_storage_error(uri, exc) from None
    files = {p: info for p, info in listing.items() if info.get("type", "file") != "directory"}
    if not files:
        raise ModelLoadError(f"model {uri!r}: no files under this prefix; check the URI (a diffusers folder with model_index.json or unet/ + scheduler/)")

    entries = sorted(
        (p[len(root) :].lstrip("/"), int(info.get("size") or 0), _version_of(info)) for p, info in files.items()
    )
    fingerprint = hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:20]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in uri.split("://", 1)[-1])[-60:]
    target = (cache_dir or default_cache_dir()) / f"{slug}-{fingerprint}"
    if (target / COMPLETE_MARKER).exists():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).exists():  # another actor finished while we waited
            return target
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            for rel, _, _ in entries:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(dest))
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"uri": uri, "files": entries}))
            if target.exists():  # a crashed copy without marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise explain_storage_error(uri, exc) from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialize_file(uri: str, storage_options: dict | None = None, cache_dir: Path | None = None) -> Path:
    """A single file (a CLIP or LPIPS checkpoint): a local path as is, a remote one copied into the
    cache once per (URI, object version)."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise StorageError(f"{uri}: no such file")
        return path
    fs, path = url_to_fs(uri, storage_options)
    try:
        info = fs.info(path)
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None
    fingerprint = hashlib.sha256(json.dumps([uri, int(info.get("size") or 0), _version_of(info)]).encode()).hexdigest()[:20]
    target = (cache_dir or default_cache_dir()) / "files" / fingerprint / path.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, target)  # atomic: actors that race each write their own temporary copy
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
