"""Build input shards for pipeline tests, with the bad cases users meet."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rgb_image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    from pipeline.data.shards import write_samples

    buf = io.BytesIO()
    write_samples(buf, samples)
    return buf.getvalue()


def good_samples(shard: int, n: int, size: int = 16) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for i in range(n):
        key = f"s{shard:02d}-{i:03d}"
        out.append((key, {"png": png(rgb_image(shard * 1000 + i, size)),
                          "json": json.dumps({"label": i, "shard": shard}).encode(),
                          "txt": f"caption {key}".encode(), "cls": str(i % 3).encode()}))
    return out


def odd_samples(size: int = 16) -> list[tuple[str, dict[str, bytes]]]:
    """Images in modes that must be converted (valid), plus samples that must be rejected."""
    g = np.random.default_rng(99)
    gray = g.integers(0, 256, (size, size), dtype=np.uint8)
    rgba = g.integers(0, 256, (size, size, 4), dtype=np.uint8)
    deep = (g.integers(0, 65536, (size, size), dtype=np.uint16))
    buf16 = io.BytesIO()
    Image.fromarray(deep).save(buf16, format="PNG")
    return [
        ("odd-gray", {"png": png(gray)}),
        ("odd-rgba", {"png": png(rgba)}),
        ("odd-16bit", {"png": buf16.getvalue()}),
        ("bad-corrupt", {"png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "json": b"{}"}),
        ("bad-noimage", {"json": b'{"only": "metadata"}'}),
    ]


VALID_ODD = {"odd-gray", "odd-rgba", "odd-16bit"}
REJECTED_ODD = {"bad-corrupt", "bad-noimage"}


def truncated(tar: bytes, keep_samples: int, members_per_sample: int = 4) -> bytes:
    """Cut a tar inside the first member after ``keep_samples`` whole samples."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = t.getmembers()
    cut = members[keep_samples * members_per_sample]
    return tar[: cut.offset_data + min(100, cut.size // 2)]


def raw_tar(members: list[tuple[str, bytes | str | None]]) -> bytes:
    """A tar with exactly these members, in order, names unchecked (for the cases webdataset
    will not write): ``bytes`` → a regular file, ``str`` → a symlink to it, ``None`` → a directory."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if isinstance(data, bytes):
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if isinstance(data, str) else tarfile.DIRTYPE
                info.linkname = data or ""
                t.addfile(info)
    return buf.getvalue()
