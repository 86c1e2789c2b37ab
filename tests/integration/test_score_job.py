"""CLIP scores end to end on a real S3 server with local Ray and tiny random models: translate
scoring inline, `latentshift score` on the same output, its re-run, its rejects, its preflight."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_builders import good_samples, tar_bytes

from pipeline.config import validate
from pipeline.data.scores import read_scores, score_metadata
from pipeline.data.shards import iter_tar_samples
from pipeline.errors import ConfigError
from pipeline.jobs import run_job
from pipeline.tools.random_clip import save_random_clip


@pytest.fixture
def bucket(s3):
    name = f"score-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


def config(bucket, endpoint, source, target, clip_files, **overrides) -> dict:
    opts = {"endpoint_url": endpoint}
    cfg = {
        "input": {"uri": f"s3://{bucket}/in/", "storage_options": opts},
        "output": {"uri": f"s3://{bucket}/out", "storage_options": opts, "latents": "none"},
        "source": {"model": str(source)},
        "target": {"model": str(target)},
        "sampler": {"steps": 4, "eta": 0.5, "strength": 0.5},
        "image": {"size": 16},
        "runtime": {"batch_size": 4, "actors": 1},
        "clip": {"model": clip_files[0], "pretrained": clip_files[1]},
        "score": {"source_text": "a photo of a cat", "target_text": "a photo of a dog"},
    }
    for k, v in overrides.items():
        cfg[k].update(v)
    return cfg


def keys_of(data: bytes) -> list[str]:
    return [s.key for s in iter_tar_samples(io.BytesIO(data))]


def snapshot(s3, prefix: str) -> dict[str, bytes]:
    s3.invalidate_cache()  # the runs wrote through other handles: list afresh
    return {p: s3.cat_file(p) for p in s3.find(prefix)}


def scores_by_key(s3, path: str) -> dict[str, tuple[float, float]]:
    s3.invalidate_cache()
    table = pq.read_table(io.BytesIO(s3.cat_file(path)))  # plain pyarrow: no Ray, no torch
    return {k: (c, d) for k, c, d in zip(table["key"].to_pylist(), table["clip_score"].to_pylist(),
                                         table["directional"].to_pylist(), strict=True)}


def test_inline_scores_then_the_score_job_on_the_same_output(ray_cluster, s3, s3_server, bucket, pixel_model,
                                                             other_pixel_model, tmp_path):
    clip_files = save_random_clip(tmp_path / "clip")
    shard_a, shard_b = good_samples(0, 5), good_samples(1, 3)
    s3.pipe(f"{bucket}/in/shard-a.tar", tar_bytes(shard_a))
    s3.pipe(f"{bucket}/in/shard-b.tar", tar_bytes(shard_b))
    out = f"{bucket}/out"

    # translate with score.inline: every output scored as it is made, scores/<shard>.parquet committed with it
    inline_cfg = validate(config(bucket, s3_server, pixel_model, other_pixel_model, clip_files,
                                 score={"inline": True}))
    translated = run_job(inline_cfg, "translate")
    assert translated["shards_done"] == 2 and translated["scored"] == 8
    inline = {n: scores_by_key(s3, f"{out}/scores/{n}.parquet") for n in ("shard-a", "shard-b")}
    assert list(inline["shard-a"]) == keys_of(s3.cat_file(f"{out}/images/shard-a.tar"))  # one row per output, in order
    values = np.array([v for n in inline for v in inline[n].values()])
    assert np.isfinite(values).all() and (np.abs(values) <= 1 + 1e-6).all()
    members = {s.key: s.members for s in iter_tar_samples(io.BytesIO(s3.cat_file(f"{out}/images/shard-a.tar")))}
    prov = json.loads(members["s00-002"]["latentshift.json"])
    assert prov["clip_score"] == pytest.approx(inline["shard-a"]["s00-002"][0], abs=1e-6)
    assert prov["score"]["target_text"] == "a photo of a dog" and prov["score"]["clip_model"] == clip_files[0]
    meta = score_metadata(pq.read_table(io.BytesIO(s3.cat_file(f"{out}/scores/shard-a.parquet"))))
    assert meta["job"] == "translate" and meta["settings"]["score"] == prov["score"]  # the file says it too
    translate_files = {p: b for p, b in snapshot(s3, out).items() if "/scores/" not in p}

    # `score` on that output: the same numbers from the written images, and nothing of translate's touched
    score_cfg = validate(config(bucket, s3_server, "/nonexistent/source", "/nonexistent/target", clip_files))
    scored = run_job(score_cfg, "score")  # the diffusion models are never loaded: they do not exist
    assert scored["shards_done"] == 2 and scored["scored"] == 8 and scored["images"] == 0 and scored["rejected"] == 0
    again = {n: scores_by_key(s3, f"{out}/scores/{n}.parquet") for n in ("shard-a", "shard-b")}
    for name in inline:
        assert list(again[name]) == list(inline[name])
        np.testing.assert_allclose(np.array(list(again[name].values())), np.array(list(inline[name].values())),
                                   atol=1e-5)
    after = snapshot(s3, out)
    assert {p: b for p, b in after.items() if p in translate_files} == translate_files  # images/, _ledger/ as they were
    new = sorted(p.removeprefix(out + "/") for p in set(after) - set(translate_files) if "/scores/" not in p)
    assert new and all(p.startswith("_score/_ledger/") for p in new), new  # its records apart, no staging left
    assert read_scores(f"s3://{out}", {"endpoint_url": s3_server}).num_rows == 8
    meta = score_metadata(pq.read_table(io.BytesIO(s3.cat_file(f"{out}/scores/shard-b.parquet"))))
    assert meta["job"] == "score" and meta["settings"]["target_text"] == "a photo of a dog"

    # a re-run is a no-op: both shards skipped, nothing rewritten
    rerun = run_job(score_cfg, "score")
    assert rerun["shards_done"] == 0 and rerun["shards_skipped"] == 2
    assert {p: b for p, b in snapshot(s3, out).items() if "/runs/" not in p} == {
        p: b for p, b in after.items() if "/runs/" not in p}

    # an input image gone: that sample is a reject naming its key and shard; the rest is scored (--overwrite)
    s3.pipe(f"{bucket}/in/shard-b.tar", tar_bytes([s for s in shard_b if s[0] != "s01-001"]))
    redo = run_job(score_cfg, "score", overwrite=True)
    assert redo["shards_done"] == 2 and redo["rejected"] == 1 and redo["scored"] == 7
    rejects = [json.loads(line) for line in s3.cat_file(f"{out}/_score/_rejects/shard-b.jsonl").splitlines()]
    assert len(rejects) == 1 and rejects[0]["key"] == "s01-001"
    assert "'s01-001'" in rejects[0]["reason"] and "'shard-b'" in rejects[0]["reason"]
    assert list(scores_by_key(s3, f"{out}/scores/shard-b.parquet")) == ["s01-000", "s01-002"]
    assert not s3.exists(f"{out}/_rejects/shard-b.jsonl")  # translate's rejects are not the score job's


def test_clip_pretrained_unset_fails_before_any_model(ray_cluster, s3, s3_server, bucket, tmp_path):
    clip_files = save_random_clip(tmp_path / "clip")
    s3.pipe(f"{bucket}/in/shard-a.tar", tar_bytes(good_samples(0, 2)))
    raw = config(bucket, s3_server, "/nonexistent/source", "/nonexistent/target", clip_files)
    raw["clip"]["pretrained"] = None
    for job, extra in (("score", {}), ("translate", {"inline": True})):
        cfg = validate({**raw, "score": {**raw["score"], **extra}})
        with pytest.raises(ConfigError, match=r"clip\.pretrained"):  # not the missing models: they come later
            run_job(cfg, job)
    assert not s3.exists(f"{bucket}/out")  # nothing probed, staged or recorded
