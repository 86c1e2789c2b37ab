"""`latentshift gallery` end to end on a real S3 server and local Ray: a committed output written directly (as
tests/integration/test_eval_job.py's last test writes one), the job's pages, a re-run that skips the shards it
showed, the shards shown again after their images were committed again or the layout changed; and
``output.gallery``: translate with tiny models writes the gallery of its output at its end."""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest
from gallery_builders import HOSTILE_KEY, committed_output, s0_keys
from PIL import Image
from shard_builders import good_samples, tar_bytes

from pipeline.config import validate
from pipeline.jobs import run_job


@pytest.fixture
def bucket(s3):
    name = f"gallery-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


def config(bucket, endpoint, **gallery) -> dict:
    opts = {"endpoint_url": endpoint}
    return {"input": {"uri": f"s3://{bucket}/in/", "storage_options": opts},
            "output": {"uri": f"s3://{bucket}/out", "storage_options": opts},
            "gallery": {"page_size": 4, "thumb_size": 24, **gallery}}


def by_score(shard: str, pages: int, scores=("clip_score", "directional", "psnr", "ssim")) -> set[str]:
    """A shard's pages in the order of each of its scores, lowest and highest first."""
    return {f"{shard}/by-{s}-{d}{'' if k == 1 else f'-{k}'}.html" for s in scores for d in ("asc", "desc")
            for k in range(1, pages + 1)}


def files(s3, prefix: str) -> set[str]:
    return {p[len(prefix):] for p in s3.find(prefix)}


def test_gallery_of_a_committed_output_then_only_what_changed(ray_cluster, s3, s3_server, bucket):
    committed_output(lambda path, data: s3.pipe(f"{bucket}/{path}", data), "out", "in")
    cfg = config(bucket, s3_server)

    printed = io.StringIO()
    first = run_job(validate(cfg), "gallery", out=printed)
    assert first["shards_done"] == 2 and first["gallery_shards"] == 2 and first["gallery_samples"] == 6
    assert first["images"] == 6 and first["outputs"] == []  # samples put on pages; no output kind of a shard
    gallery = f"{bucket}/out/gallery/"
    thumbs = {f"s0/thumbs/{i:06d}{s}.webp" for i in range(6) for s in ("", ".in")} | {"s0/thumbs/000003.1.webp"}
    assert files(s3, gallery) == {"index.html", "s0/index.html", "s0/page-2.html", "s0/rejects.html",
                                  "s1/index.html", "s1/rejects.html"} | thumbs | by_score("s0", 2)
    for name in thumbs:
        with Image.open(io.BytesIO(s3.cat_file(gallery + name))) as im:
            assert im.format == "WEBP" and max(im.size) <= 24
    page = s3.cat_file(gallery + "s0/index.html").decode()
    assert page.count('<figure class="card"') == 4 and HOSTILE_KEY not in page  # escaped: &lt;img …
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    index = s3.cat_file(gallery + "index.html").decode()
    assert 'href="s0/index.html"' in index and 'href="s1/rejects.html"' in index and "20240102-000000-bbbbbb" in index
    assert s3.exists(f"{bucket}/out/_gallery/_ledger/s0.json") and s3.exists(f"{bucket}/out/_gallery/shards/s0.json")
    assert "gallery    2 shard(s), 6 sample(s)" in printed.getvalue()

    second = run_job(validate(cfg), "gallery")
    assert second["shards_done"] == 0 and second["shards_skipped"] == 2 and second["redone"] == []
    assert second["images"] == 0
    assert files(s3, gallery) == {"index.html", "s0/index.html", "s0/page-2.html", "s0/rejects.html",
                                  "s1/index.html", "s1/rejects.html"} | thumbs | by_score("s0", 2)

    # s0 committed again (translate --overwrite): three samples now; it is shown again, s1 is not
    samples = [(k, {"png": _png(i)}) for i, k in enumerate(s0_keys()[:3])]
    s3.pipe(f"{bucket}/out/images/s0.tar", tar_bytes(samples))
    s3.pipe(f"{bucket}/out/_ledger/s0.json", json.dumps({"shard": "s0", "committed_at": time.time()}).encode())
    third = run_job(validate(cfg), "gallery")
    assert third["redone"] == ["s0"] and third["shards_done"] == 1 and third["shards_skipped"] == 1
    assert third["gallery_samples"] == 3 and third["images"] == 3
    now = files(s3, gallery)
    assert "s0/page-2.html" not in now and "s0/thumbs/000003.webp" not in now and "s1/index.html" in now
    # its samples have CLIP scores (scores/s0.parquet) but no provenance now, so no PSNR or SSIM order
    assert {p for p in now if p.startswith("s0/by-")} == by_score("s0", 1, ("clip_score", "directional"))

    # another layout (gallery.page_size): every shard shown again
    fourth = run_job(validate(config(bucket, s3_server, page_size=2)), "gallery")
    assert sorted(fourth["redone"]) == ["s0", "s1"] and fourth["shards_done"] == 2
    assert "s0/page-2.html" in files(s3, gallery)


def _png(seed: int) -> bytes:
    from gallery_builders import picture
    from shard_builders import png

    return png(picture(seed, (16, 16)))


def test_output_gallery_translate_writes_the_gallery_of_its_output(ray_cluster, s3, s3_server, bucket, pixel_model,
                                                                   other_pixel_model):
    s3.pipe(f"{bucket}/in/shard-a.tar", tar_bytes(good_samples(0, 3)))
    s3.pipe(f"{bucket}/in/shard-b.tar", tar_bytes(good_samples(1, 2)))
    cfg = config(bucket, s3_server)
    cfg["output"]["gallery"] = True
    cfg.update(source={"model": str(pixel_model)}, target={"model": str(other_pixel_model)},
               sampler={"steps": 4, "eta": 0.5, "strength": 0.6}, image={"size": 16},
               runtime={"batch_size": 4, "actors": 1})

    printed = io.StringIO()
    summary = run_job(validate(cfg), "translate", out=printed)
    assert summary["shards_done"] == 2 and summary["images"] == 5
    out = printed.getvalue()
    assert "latentshift gallery" in out and "gallery    2 shard(s), 5 sample(s)" in out
    page = s3.cat_file(f"{bucket}/out/gallery/shard-a/index.html").decode()
    # input | output for each sample, paired by key with the input shard; the run's settings on the index
    assert page.count('alt="input"') == 3 and page.count('alt="output"') == 3 and "not in input shard" not in page
    index = s3.cat_file(f"{bucket}/out/gallery/index.html").decode()
    # the settings its samples record, and the translate run's record (written before the gallery ran)
    assert str(pixel_model) in index and "shard-b/index.html" in index and summary["run_id"] in index
    assert out.index("latentshift translate") < out.index("latentshift gallery")
    runs = s3.ls(f"{bucket}/out/_gallery/_ledger/runs/", refresh=True)
    assert len(runs) == 1

    again = run_job(validate(cfg), "translate")  # nothing to translate; the gallery has nothing new either
    assert again["shards_skipped"] == 2
    records = [json.loads(s3.cat_file(p)) for p in sorted(s3.ls(f"{bucket}/out/_gallery/_ledger/runs/", refresh=True))]
    assert len(records) == 2 and records[1]["shards_done"] == 0 and records[1]["shards_skipped"] == 2

    cfg["output"]["gallery"] = False
    run_job(validate(cfg), "translate")
    assert len(s3.ls(f"{bucket}/out/_gallery/_ledger/runs/", refresh=True)) == 2  # off: no gallery run
