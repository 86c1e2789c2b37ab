"""search end to end: local Ray, the S3 server, a tiny text-to-image model and a tiny random CLIP."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_builders import tar_bytes

from pipeline.config import validate
from pipeline.data.shards import iter_tar_samples
from pipeline.diffusion import load_denoiser
from pipeline.errors import ConfigError
from pipeline.jobs import run_job
from pipeline.tools.random_clip import save_random_clip


def photos(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append((f"img{seed}-{i:02d}", {"png": buf.getvalue(), "txt": b"a caption"}))
    return out


@pytest.fixture
def search_setup(s3, s3_server, tmp_path):
    bucket = f"search-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    s3.pipe(f"{bucket}/in/shard-0.tar", tar_bytes(photos(3, 0) + [("broken", {"png": b"not a png"})]))
    s3.pipe(f"{bucket}/in/shard-1.tar", tar_bytes(photos(2, 1)))
    clip_config, clip_weights = save_random_clip(tmp_path / "clip")
    return bucket, {"endpoint_url": s3_server}, clip_config, clip_weights


def config(bucket, opts, model, clip_config, clip_weights, **search):
    return validate({
        "input": {"uri": f"s3://{bucket}/in/", "storage_options": opts},
        "output": {"uri": f"s3://{bucket}/out", "storage_options": opts},
        "source": {"model": str(model), "condition": "a photo of a cat"},
        "target": {"condition": "a photo of a dog"},
        "sampler": {"steps": 6, "eta": 0.1},
        "search": {"trials": 2, "skips": [1, 3], "decoder_scales": [1.0, 2.0], **search},
        "clip": {"model": clip_config, "pretrained": clip_weights},
        "image": {"size": 16}, "runtime": {"batch_size": 2},
    })


def test_search_writes_the_winner_its_settings_and_scores_once(ray_cluster, s3, search_setup, sd_model):
    bucket, opts, clip_config, clip_weights = search_setup
    cfg = config(bucket, opts, sd_model, clip_config, clip_weights, top_k=2)
    full_grid = load_denoiser(str(sd_model)).schedule.grid(6)
    summary = run_job(cfg, "search")
    assert summary["images"] == 5 and summary["rejected"] == 1 and summary["candidates_per_input"] == 8
    assert summary["scored"] == 5 and -1 <= summary["mean_directional"] <= 1

    samples = [(t.key, t.members) for t in iter_tar_samples(io.BytesIO(s3.cat_file(f"{bucket}/out/images/shard-0.tar")))]
    assert [k for k, _ in samples] == ["img0-00", "img0-01", "img0-02"]
    table = pq.read_table(io.BytesIO(s3.cat_file(f"{bucket}/out/scores/shard-0.parquet"))).to_pylist()
    assert [(r["key"], r["rank"]) for r in table] == [(k, r) for k, _ in samples for r in (0, 1)]
    for key, members in samples:
        assert {"png", "top2.png", "txt", "latentshift.json"} <= set(members)
        prov = json.loads(members["latentshift.json"])
        assert prov["job"] == "search" and prov["search"]["skips"] == [1, 3] and prov["candidates_per_input"] == 8
        chosen, ranked = prov["chosen"], prov["ranked"]
        assert 0 <= prov["candidate"] < 8 and ranked[0]["candidate"] == prov["candidate"]
        assert ranked[0]["directional"] >= ranked[1]["directional"]  # best first
        assert {k: v for k, v in chosen.items() if k != "t0"} == {
            k: v for k, v in ranked[0].items() if k not in ("candidate", "directional")}
        assert chosen["skip"] in (1, 3) and chosen["strength"] == (6 - chosen["skip"]) / 6
        # the winning walk: the model's 6-step grid without its first `skip` entries, starting at t0
        assert prov["timesteps"] == full_grid[chosen["skip"]:] and chosen["t0"] == full_grid[chosen["skip"]]
        rows = [r for r in table if r["key"] == key]
        assert rows[0]["candidate"] == prov["candidate"] and rows[0]["decoder_scale"] == chosen["decoder_scale"]
        assert rows[0]["directional"] == pytest.approx(prov["directional"], abs=1e-6)
        assert -1 <= prov["clip_score"] <= 1 and np.isnan(rows[1]["clip_score"])
        winner = np.asarray(Image.open(io.BytesIO(members["png"])))
        assert winner.shape == (16, 16, 3) and not np.array_equal(winner, np.asarray(Image.open(io.BytesIO(members["top2.png"]))))
    rejects = s3.cat_file(f"{bucket}/out/_rejects/shard-0.jsonl").decode()
    assert "broken" in rejects

    again = run_job(cfg, "search")
    assert again["shards_done"] == 0 and again["shards_skipped"] == 2


def test_search_preflight_names_the_key(s3, search_setup, sd_model, tmp_path):
    bucket, opts, clip_config, clip_weights = search_setup
    cfg = config(bucket, opts, sd_model, clip_config, clip_weights)
    for override, key in (({"clip": {"model": clip_config}}, "clip.pretrained"),
                          ({"search": {"skips": [6]}}, "skips"),
                          ({"target": {"condition": None}}, "score.target_text"),
                          ({"target": {"model": str(tmp_path), "condition": "x"}}, "target.model"),
                          ({"search": {"top_k": 9, "trials": 1, "skips": [1], "decoder_scales": [1.0]}}, "search.top_k")):
        data = cfg.to_dict()
        for section, values in override.items():
            data[section] = {**data[section], **values}
        if "clip" in override:
            data["clip"]["pretrained"] = None
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            run_job(validate(data), "search")
