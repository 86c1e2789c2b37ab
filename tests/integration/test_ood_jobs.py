"""ood fit / ood sample end to end: local Ray, the S3 server, a tiny model."""

from __future__ import annotations

import io
import json
import logging
import uuid

import numpy as np
import pytest
from PIL import Image
from shard_builders import tar_bytes

from pipeline.config import validate
from pipeline.data.latents import read_latents
from pipeline.data.shards import iter_tar_samples
from pipeline.data.stats import read_stats
from pipeline.errors import ConfigError, StorageError
from pipeline.jobs import run_job


def shapes_shard(shard: int, n: int, bright: bool) -> bytes:
    rng = np.random.default_rng(shard)
    samples = []
    for i in range(n):
        img = np.zeros((16, 16, 3), dtype=np.uint8)
        x, y = rng.integers(0, 8, 2)
        img[y : y + 8, x : x + 8] = rng.integers(150, 256, 3) if bright else rng.integers(0, 60, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        samples.append((f"img{shard}-{i:03d}", {"png": buf.getvalue()}))
    return tar_bytes(samples)


@pytest.fixture
def ood_setup(s3, s3_server):
    bucket = f"ood-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    for s in range(2):
        s3.pipe(f"{bucket}/ood/shard-{s}.tar", shapes_shard(s, 10, bright=True))
        s3.pipe(f"{bucket}/id/shard-{s}.tar", shapes_shard(10 + s, 10, bright=False))
    opts = {"endpoint_url": s3_server}
    return bucket, opts


def config(bucket, opts, model, **ood):
    return validate({
        "input": {"uri": f"s3://{bucket}/ood/", "storage_options": opts},
        "output": {"uri": f"s3://{bucket}/unseen", "storage_options": opts},
        "source": {"model": str(model)},
        "ood": {"t0": 500, "inversion_steps": 10, "count": 7, "shard_size": 3, "reservoir": 12, "tolerance": 3.0, **ood},
        "image": {"size": 16}, "runtime": {"batch_size": 5},
    })


def test_fit_then_sample_exactly_count_and_rerun_noop(ray_cluster, s3, ood_setup, pixel_model, caplog):
    bucket, opts = ood_setup
    cfg = config(bucket, opts, pixel_model, t0=510)
    with caplog.at_level(logging.INFO, logger="pipeline.jobs.ood_fit"):
        fit = run_job(cfg, "ood-fit", reference=f"s3://{bucket}/id/")
    # t0 = 510 is not on this model's grid (20 leading steps over 1000: …, 500, 550, …): snapped and logged
    assert "ood.t0 = 510 is not on the model's grid; snapped to 500" in caplog.text

    tensors, header = read_stats(f"s3://{bucket}/unseen/stats/ood.safetensors", opts)
    assert header["count"] == 20 and header["t0_requested"] == 510 and header["t0"] == header["timesteps"][0] == 500
    assert header["model"] == str(pixel_model) and header["shape"] == [3, 16, 16]
    assert tensors["mean"].shape == (768,) and tensors["variance"].shape == (1,) and tensors["reference"].shape == (12, 768)
    g = header["geometry"]
    assert g["distance_std"] > 0 and 0 < g["angle_origin_mean"] < 180 and 0 < g["angle_point_mean"] < 180

    # output.latents (default full): the inverted latents are written per input shard, as encode does
    assert header["latents_written"] == 20
    latents = dict(read_latents(f"s3://{bucket}/unseen/latents/", opts))
    assert len(latents) == 20 and all(z.method == "ddim" and z.timesteps[0] == 500 for z in latents.values())
    assert next(iter(latents.values())).x_start.shape == (3, 16, 16)

    report = json.loads(s3.cat_file(f"{bucket}/unseen/report/ood_vs_id.json"))
    assert report["separability"]["mean_distance"] > 0 and report["separability"]["d_quarter"] == pytest.approx(768**0.25)
    assert report["ood"]["count"] == 20 and report["id"]["count"] == 20 and isinstance(report["distinguishable"], bool)
    assert s3.cat_file(f"{bucket}/unseen/report/ood_vs_id.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert fit["report"]["distinguishable"] == report["distinguishable"]
    # does each selection tell real OOD latents from ID ones? rates on both, for the user to judge
    assert set(report["selection"]) == {"tolerance_3", "window_official", "window_calibrated_0.9"}
    assert all(0 <= r["ood"] <= 1 and 0 <= r["id"] <= 1 for r in report["selection"].values())
    assert report["selection"]["window_calibrated_0.9"]["ood"] > report["selection"]["window_official"]["ood"]

    again = run_job(cfg, "ood-fit")  # same inputs and settings: up to date
    assert again.get("up_to_date") is True

    summary = run_job(cfg, "ood-sample")
    assert summary["images"] == 7 and summary["shards_done"] == 3 and 0 < summary["acceptance_rate"] <= 1
    keys = []
    for name in ("unseen-00000", "unseen-00001", "unseen-00002"):
        for s in iter_tar_samples(io.BytesIO(s3.cat_file(f"{bucket}/unseen/images/{name}.tar"))):
            keys.append(s.key)
            prov = json.loads(s.members["latentshift.json"])
            assert prov["candidate"] == int(s.key) and prov["t0"] == header["t0"]
            assert prov["candidates"]["mode"] == "gaussian" and prov["candidates"]["selection"] == "tolerance"
            assert np.asarray(Image.open(io.BytesIO(s.members["png"]))).shape == (16, 16, 3)
    assert len(keys) == len(set(keys)) == 7

    rerun = run_job(cfg, "ood-sample")
    assert rerun["shards_done"] == 0 and rerun["shards_skipped"] == 3 and rerun["images"] == 0


def test_sampling_without_geometric_selection_keeps_every_candidate(ray_cluster, s3, ood_setup, pixel_model):
    bucket, opts = ood_setup
    cfg = config(bucket, opts, pixel_model, geometric=False, count=4, shard_size=4)
    run_job(cfg, "ood-fit")
    s = run_job(cfg, "ood-sample")
    assert s["acceptance_rate"] == 1.0 and s["images"] == 4
    keys = [x.key for x in iter_tar_samples(io.BytesIO(s3.cat_file(f"{bucket}/unseen/images/unseen-00000.tar")))]
    assert keys == ["000000000", "000000001", "000000002", "000000003"]


def test_slerp_candidates_optimised_and_windowed_are_regenerated_on_the_actors(ray_cluster, s3, ood_setup, pixel_model):
    """ood.candidates: slerp (weight chosen by the geometry), a calibrated official window and two
    optimisation steps; the actors regenerate each kept latent from its index alone: the latent the
    run stored at t0 is the one the maths makes from (stats, seed, index, settings in provenance)."""
    import torch

    from pipeline.diffusion.ood import CandidateSettings, candidate_latent
    from pipeline.stages.ood import ood_stats

    bucket, opts = ood_setup
    cfg = config(bucket, opts, pixel_model, count=3, shard_size=3, candidates="slerp", selection="window",
                 window="calibrated", window_coverage=1.0, optimise_steps=2, slerp_target_rate=0.3)
    cfg.sampler.seed = 7
    run_job(cfg, "ood-fit")
    s = run_job(cfg, "ood-sample")
    c = s["candidates"]
    assert s["images"] == 3 and c["mode"] == "slerp" and c["selection"] == "window" and c["optimise_steps"] == 2
    assert c["weight"] in [k / 21 for k in range(1, 21)] and 0 <= s["reservoir_acceptance_rate"] <= 1
    stats = ood_stats(*read_stats(f"s3://{bucket}/unseen/stats/ood.safetensors", opts))
    stored = dict(read_latents(f"s3://{bucket}/unseen/latents/unseen-00000.parquet", opts))  # (not the fit's)
    assert len(stored) == 3
    for key, z in stored.items():
        prov_settings = CandidateSettings.from_dict(c)
        expected = candidate_latent(stats, 7, int(key), prov_settings).reshape(z.x_start.shape)
        assert torch.allclose(torch.from_numpy(z.x_start).double(), expected, atol=5e-3)  # float16 on disk


def test_bad_inputs(ray_cluster, s3, ood_setup, pixel_model, other_pixel_model):
    bucket, opts = ood_setup
    cfg = config(bucket, opts, pixel_model, count=2)
    run_job(cfg, "ood-fit")
    other_model = config(bucket, opts, other_pixel_model, count=2)
    with pytest.raises(ConfigError, match=r"ood\.stats .*fitted with model .*not source\.model"):
        run_job(other_model, "ood-sample")
    other_t0 = config(bucket, opts, pixel_model, count=2, t0=300)
    with pytest.raises(ConfigError, match=r"fitted at t0 = 500, not ood\.t0 = 300"):
        run_job(other_t0, "ood-sample")
    tight = config(bucket, opts, pixel_model, count=2, tolerance=1e-9)
    with pytest.raises(ConfigError, match=r"^config error: ood sample: geometric selection \(tolerance\) kept 0 of"):
        run_job(tight, "ood-sample")
    empty = config(bucket, opts, pixel_model)
    empty.input.uri = f"s3://{bucket}/nothing/"
    with pytest.raises(StorageError, match="no .tar shards found"):
        run_job(empty, "ood-fit")
    s3.pipe(f"{bucket}/broken/x.tar", tar_bytes([("a", {"png": b"not a png"})]))
    broken = config(bucket, opts, pixel_model)
    broken.input.uri = f"s3://{bucket}/broken/"
    with pytest.raises(StorageError, match=r"no image could be inverted \(1 rejected"):
        run_job(broken, "ood-fit", overwrite=True)
    assert "undecodable image" in s3.cat_file(f"{bucket}/unseen/_rejects/x.jsonl").decode()
    missing = config(bucket, opts, pixel_model)
    missing.ood.stats = f"s3://{bucket}/no/such.safetensors"
    with pytest.raises(StorageError, match="not found"):
        run_job(missing, "ood-sample")
