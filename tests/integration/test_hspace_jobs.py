"""direction fit / edit end to end: local Ray, the S3 server, a tiny model."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image
from shard_builders import REJECTED_ODD, odd_samples, tar_bytes

from pipeline.config import validate
from pipeline.data.directions import read_direction
from pipeline.data.shards import iter_tar_samples
from pipeline.errors import ConfigError, StorageError
from pipeline.jobs import run_job


def squares(shard: int, n: int, red: bool) -> list:
    rng = np.random.default_rng(shard)
    samples = []
    for i in range(n):
        img = np.full((16, 16, 3), 40, dtype=np.uint8)
        x, y = rng.integers(0, 8, 2)
        img[y : y + 8, x : x + 8] = (220, 30, 30) if red else (30, 30, 220)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        samples.append((f"sq{shard}-{i:03d}", {"png": buf.getvalue(), "cls": b"1"}))
    return samples


@pytest.fixture
def hspace_setup(s3, s3_server):
    bucket = f"hs-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    s3.pipe(f"{bucket}/blue/shard-0.tar", tar_bytes(squares(0, 6, red=False)))
    rejects = [s for s in odd_samples() if s[0] in REJECTED_ODD]
    s3.pipe(f"{bucket}/blue/shard-1.tar", tar_bytes(squares(1, 4, red=False) + rejects))
    s3.pipe(f"{bucket}/red/shard-0.tar", tar_bytes(squares(10, 6, red=True)))
    return bucket, {"endpoint_url": s3_server}


def config(bucket, opts, model, **hspace):
    return validate({
        "input": {"uri": f"s3://{bucket}/blue/", "storage_options": opts},
        "output": {"uri": f"s3://{bucket}/out", "storage_options": opts, "latents": "start"},
        "source": {"model": str(model)},
        "hspace": {"direction": f"s3://{bucket}/dirs/blue2red.safetensors", "direction_storage_options": opts,
                   "examples": f"s3://{bucket}/red/", "t0": 999, "steps": 8, **hspace},
        "image": {"size": 16}, "runtime": {"batch_size": 4},
    })


def _samples(s3, uri):
    return [(t.key, t.members) for t in iter_tar_samples(io.BytesIO(s3.cat_file(uri)))]


def test_fit_a_mean_difference_then_edit_with_rejects_and_rerun_noop(ray_cluster, s3, hspace_setup, pixel_model):
    bucket, opts = hspace_setup
    cfg = config(bucket, opts, pixel_model, t_edit=400, t_boost=0)
    fit = run_job(cfg, "direction-fit")
    assert fit["count"] == 10 and fit["count_b"] == 6 and fit["t_edit"] == 400 and fit["t_boost"] == 0
    tensors, header = read_direction(cfg.hspace.direction, opts)
    assert header["kind"] == "table" and header["model"] == str(pixel_model) and header["steps"] == 8
    grid = header["timesteps"]
    assert len(grid) == 8 and grid[0] == header["t0"] and header["t0_requested"] == 999
    deltas = tensors["deltas"]
    assert deltas.shape[0] == 8 and deltas.ndim == 4 and np.all(np.isfinite(deltas))
    assert header["delta_norms"][0] > 0 and len(header["h_norms_a"]) == 8

    # the direction is mean(h | red) − mean(h | blue), checked by walking both sets here
    import torch

    from pipeline.data.model_store import resolve_model
    from pipeline.diffusion import ddim_invert_model_space, load_denoiser
    from pipeline.diffusion.hspace import trace_h

    den = load_denoiser(resolve_model(str(pixel_model)))

    def mean_h(samples):
        imgs = [np.asarray(Image.open(io.BytesIO(m["png"])).convert("RGB")) for _, m in samples]
        x0 = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = ddim_invert_model_space(den, x0, timesteps=grid)
        return trace_h(den, z.x_start, grid).h.double().mean(0)

    expected = mean_h(squares(10, 6, True)) - mean_h(squares(0, 6, False) + squares(1, 4, False))
    np.testing.assert_allclose(deltas, expected.float().numpy(), atol=2e-4, rtol=1e-3)

    edit_cfg = config(bucket, opts, pixel_model, scales=[0.0, 1.0, 2.0])
    edit_cfg.output.uri = f"s3://{bucket}/edited"
    out = run_job(edit_cfg, "edit")
    assert out["images"] == 10 and out["rejected"] == len(REJECTED_ODD) and out["shards_done"] == 2
    samples = _samples(s3, f"{bucket}/edited/images/shard-1.tar")
    assert [k for k, _ in samples] == [f"sq1-{i:03d}" for i in range(4)]  # same keys, rejects left out
    key, members = samples[0]
    assert {"png", "scale1.png", "scale2.png", "latentshift.json", "cls"} <= set(members)
    prov = json.loads(members["latentshift.json"])
    assert prov["job"] == "edit" and prov["t_edit"] == 400 and prov["t_boost"] == 0 and prov["scales"] == [0.0, 1.0, 2.0]
    assert prov["scale_members"] == {"png": 0.0, "scale1.png": 1.0, "scale2.png": 2.0}
    assert prov["direction"] == cfg.hspace.direction and prov["direction_header"]["kind"] == "table"
    assert prov["grid_scale"] == 1.0 and prov["timesteps"] == grid
    rejects = [json.loads(line) for line in s3.cat_file(f"{bucket}/edited/_rejects/shard-1.jsonl").splitlines()]
    assert {r["key"] for r in rejects} == REJECTED_ODD

    # the random tiny model has no semantics (the demo measures the attribute on trained models): here the
    # outputs move away from the scale-0 image (the DDIM walk, Δh = 0) further at scale 2 than at scale 1
    def pixels(png):
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)

    all_samples = _samples(s3, f"{bucket}/edited/images/shard-0.tar") + samples
    moved = np.array([[np.abs(pixels(m[f"scale{j}.png"]) - pixels(m["png"])).mean() for j in (1, 2)]
                      for _, m in all_samples])
    assert np.all(moved[:, 0] > 0) and moved[:, 1].mean() > moved[:, 0].mean(), moved.mean(0)

    again = run_job(edit_cfg, "edit")
    assert again["shards_skipped"] == 2 and again["images"] == 0  # committed shards are never redone


def test_edit_config_errors_name_the_key(s3, hspace_setup, pixel_model):
    bucket, opts = hspace_setup
    cfg = config(bucket, opts, pixel_model)
    with pytest.raises(StorageError, match="blue2red.safetensors"):
        run_job(cfg, "edit")  # no direction file yet: said before any model loads
    cfg = config(bucket, opts, pixel_model, t_edit="auto")
    with pytest.raises(ConfigError, match="hspace.lpips"):
        run_job(cfg, "direction-fit")
    from pipeline.data.directions import write_direction

    write_direction(cfg.hspace.direction, opts, {"deltas": np.zeros((1, 4, 2, 2), np.float32)},
                    {"kind": "table", "timesteps": [999], "steps": 8, "t_edit": 500, "t_boost": 200})
    with pytest.raises(ConfigError, match="has none: fit it with hspace.lpips set"):
        run_job(config(bucket, opts, pixel_model, t_boost="auto"), "edit")  # an edit's auto reads the file's curves
    cfg = config(bucket, opts, pixel_model, examples=None)
    with pytest.raises(ConfigError, match="hspace.examples"):
        run_job(cfg, "direction-fit")


def test_learned_direction_with_auto_times_then_edit(ray_cluster, s3, hspace_setup, pixel_model, tmp_path):
    """A DeltaBlock trained with the offline colour loss on the official grid and inversion; t_edit / t_boost
    from LPIPS curves (a random LPIPS file) in the fit, and again in the edit from the file's curves."""
    from pipeline.tools.random_clip import save_random_lpips

    bucket, opts = hspace_setup
    lpips_file = save_random_lpips(str(tmp_path / "lpips.safetensors"))
    cfg = config(bucket, opts, pixel_model, method="learned", t_edit="auto", t_boost="auto", lpips=lpips_file,
                 lpips_edit_threshold=0.05, lpips_boost_threshold=0.02, steps=6, grid="linspace", inversion_eps="lower",
                 train={"loss": "color", "target_color": [1.0, 0.0, 0.0], "images": 3, "iterations": 3,
                        "batch_size": 2, "lr": 0.05})
    fit = run_job(cfg, "direction-fit")
    tensors, header = read_direction(cfg.hspace.direction, opts)
    assert header["kind"] == "delta-block" and header["train_images"] == 3 and header["train_dtype"] == "float32"
    # the official grid: int(s + 1e-6) for s in linspace(0, 1, 6)·999, t0 not snapped (diffusion_latent.py:570-573)
    assert header["timesteps"] == [999, 799, 599, 399, 199, 0] and header["grid"] == "linspace"
    assert header["inversion_eps"] == "lower" and header["t0"] == header["t0_requested"] == 999
    assert header["trained_on"] == ["shard-0/sq0-000", "shard-0/sq0-001", "shard-0/sq0-002"]  # the first, by shard/key
    assert header["train"]["loss"] == "color" and header["train"]["lr"] == 0.05
    losses = header["losses"]["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    curves = header["lpips_curves"]
    assert curves["timesteps"] == header["timesteps"] and len(curves["x0_hat"]) == 6 and curves["text_cosine"] is None
    # t_edit: the smallest t whose mean LPIPS(x0, x̂0_t) reaches the threshold, scanning upward (×1 without texts)
    def first(name, threshold):
        return min(t for t, v in zip(curves["timesteps"], curves[name], strict=True) if v >= threshold)

    assert fit["t_edit"] == first("x0_hat", 0.05) == header["t_edit"]
    assert fit["t_boost"] == first("x_t", 0.02) == header["t_boost"]
    assert set(tensors) >= {"conv1.weight", "temb_proj.weight", "conv2.weight"}

    # the edit's auto: the file's curves with the edit's thresholds (official run_test, diffusion_latent.py:552-554)
    top = max(curves["x0_hat"])
    edit_cfg = config(bucket, opts, pixel_model, steps=12, scales=[1.0], grid="linspace", inversion_eps="lower",
                      t_edit="auto", t_boost="auto", lpips_edit_threshold=top / 3, boost_curve="x0_hat",
                      lpips_boost_threshold=top / 2)
    edit_cfg.output.uri = f"s3://{bucket}/edited-learned"
    out = run_job(edit_cfg, "edit")
    assert out["images"] == 10
    members = _samples(s3, f"{bucket}/edited-learned/images/shard-0.tar")[0][1]
    prov = json.loads(members["latentshift.json"])
    # the learned grid has 6 steps and the edit 12: Δh is halved per step (official diffusion_latent.py:626)
    assert prov["grid_scale"] == 0.5 and "scale1.png" not in members
    assert prov["t_edit"] == first("x0_hat", top / 3) and prov["t_boost"] == first("x0_hat", top / 2)
    assert prov["t_edit_setting"] == "auto" and prov["boost_curve"] == "x0_hat" and prov["grid"] == "linspace"
    assert prov["timesteps"] == [int(s + 1e-6) for s in np.linspace(0, 1, 12) * 999][::-1]

    never = edit_cfg.model_copy(deep=True)
    never.hspace.boost_curve, never.hspace.lpips_boost_threshold = "x_t", 2 * max(curves["x_t"])
    with pytest.raises(ConfigError, match=r"hspace\.t_boost = auto: LPIPS\(x0, x_t\) never reaches"):
        run_job(never, "edit")  # said by the job's check, before any model loads
