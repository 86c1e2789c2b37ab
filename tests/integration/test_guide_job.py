"""guide end to end: local Ray, the S3 server, a tiny random pixel model (and a tiny random CLIP)."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import validate
from pipeline.data.latents import read_latents
from pipeline.data.shards import iter_tar_samples
from pipeline.diffusion import dpm_decode, load_denoiser, sample_seed
from pipeline.diffusion.guidance import guide, initial_latent
from pipeline.errors import ConfigError
from pipeline.jobs import run_job
from pipeline.metrics.energy import hue_energy

STEPS, LANGEVIN, WEIGHT, HUE = 4, 3, 20.0, 120.0


@pytest.fixture
def bucket(s3, s3_server):
    name = f"guide-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name, {"endpoint_url": s3_server}


def config(bucket, opts, model, guide=None, **sections):
    return validate({
        "output": {"uri": f"s3://{bucket}/guided", "storage_options": opts, "latent_dtype": "float32"},
        "source": {"model": str(model)},
        "sampler": {"steps": STEPS, "eta": 1.0, "seed": 5},
        "guide": {"count": 5, "shard_size": 2, "energy": "hue", "target_hue": HUE, "weight": WEIGHT,
                  "langevin_steps": LANGEVIN, **(guide or {})},
        "image": {"size": 16}, "runtime": {"batch_size": 4}, **sections,
    })


def _samples(s3, uri):
    return [(t.key, t.members) for t in iter_tar_samples(io.BytesIO(s3.cat_file(uri)))]


def test_guide_writes_count_images_in_shards_with_provenance_and_a_rerun_is_a_noop(ray_cluster, s3, bucket,
                                                                                  pixel_model):
    name, opts = bucket
    cfg = config(name, opts, pixel_model)
    summary = run_job(cfg, "guide")
    assert summary["images"] == 5 and summary["shards_done"] == 3 and summary["latent_samples"] == 5
    assert summary["guide"]["energy"] == "hue" and summary["guide"]["langevin_steps"] == LANGEVIN

    den = load_denoiser(str(pixel_model), device="cpu")
    grid = den.schedule.grid(STEPS)
    images, keys = {}, []
    for shard, n in (("guided-00000", 2), ("guided-00001", 2), ("guided-00002", 1)):
        samples = _samples(s3, f"{name}/guided/images/{shard}.tar")
        assert len(samples) == n
        for key, members in samples:
            keys.append(key)
            prov = json.loads(members["latentshift.json"])
            assert prov["job"] == "guide" and prov["energy"] == "hue" and prov["target_hue"] == HUE
            assert prov["weight"] == WEIGHT and prov["step_size"] == 0.05 and prov["langevin_steps"] == LANGEVIN
            assert prov["method"] == "langevin" and prov["steps"] == STEPS and prov["eta"] == 1.0
            assert prov["noise_streams"] == ["guide-init", "langevin"] and prov["augmentations"] == 0
            assert prov["sample_seed"] == sample_seed(5, key) and prov["timesteps"] == grid
            assert prov["source_shard"] == shard
            images[key] = np.asarray(Image.open(io.BytesIO(members["png"])))
            assert images[key].shape == (16, 16, 3)
    assert keys == [f"{i:09d}" for i in range(5)]

    # an actor's image is the chain of (run seed, key) alone: remade here, in another batch, it is the same
    seeds = [sample_seed(5, k) for k in ("000000003", "000000001")]
    z0 = initial_latent(den, (3, 16, 16), steps=STEPS, eta=1.0, seeds=seeds)
    energy = hue_energy(HUE)
    res = guide(den, z0, lambda x, k: energy(x.clamp(-1, 1), k), steps=LANGEVIN, step_size=0.05, weight=WEIGHT,
                seeds=seeds)
    again = ((den.to_pixels(res.x0) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(again[0].astype(int) - images["000000003"]).max() <= 1
    assert np.abs(again[1].astype(int) - images["000000001"]).max() <= 1

    # the final z is stored (float32 here) and decodes to the guided image with the same model
    latents = dict(read_latents(f"s3://{name}/guided/latents/", opts))
    assert sorted(latents) == keys
    z = latents["000000003"]
    assert z.method == "dpm" and z.timesteps == grid and z.x_start.shape == (3, 16, 16)
    assert z.noise.shape == (STEPS, 3, 16, 16) and not np.any(z.noise[-1])  # the σ = 0 slot is held at 0
    from pipeline.diffusion.latent import Latent

    stored = Latent(torch.from_numpy(z.x_start)[None], torch.from_numpy(z.noise)[None], z.timesteps, "dpm", 1.0)
    decoded = ((dpm_decode(den, stored) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(decoded.astype(int) - images["000000003"]).max() <= 1

    rerun = run_job(cfg, "guide")
    assert rerun["shards_done"] == 0 and rerun["shards_skipped"] == 3 and rerun["images"] == 0


def test_clip_energy_with_augmentations_runs_offline_and_scores_its_outputs(ray_cluster, s3, bucket, pixel_model,
                                                                           tmp_path):
    from pipeline.tools.random_clip import save_random_clip

    name, opts = bucket
    clip_json, weights = save_random_clip(tmp_path)
    cfg = config(name, opts, pixel_model, guide={"count": 2, "energy": "clip", "text": "a green disc",
                                                 "langevin_steps": 1, "augmentations": 2,
                                                 "weight": None},  # null: clip's official λ
                 clip={"model": clip_json, "pretrained": weights}, output={
                     "uri": f"s3://{name}/guided", "storage_options": opts, "latents": "none"})
    summary = run_job(cfg, "guide")
    assert summary["images"] == 2 and summary["latent_samples"] == 0
    # a CLIP score against guide.text, and no directional CLIP (there is no input image to move from)
    assert summary["scored"] == 2 and -1 <= summary["mean_clip_score"] <= 1 and "mean_directional" not in summary
    samples = _samples(s3, f"{name}/guided/images/guided-00000.tar")
    for _, members in samples:
        prov = json.loads(members["latentshift.json"])
        assert prov["energy"] == "clip" and prov["text"] == "a green disc" and prov["augmentations"] == 2
        assert prov["augment"] == ["color", "translation", "resize", "cutout"] and -1 <= prov["clip_score"] <= 1
        assert prov["weight"] == 300 and prov["clamp"] is False  # the CLIP energy's official defaults
    assert s3.exists(f"{name}/guided/scores/guided-00000.parquet")


def test_eta_0_guide_walks_x_T_with_a_short_chain_grid_and_writes_the_long_grid_decode(ray_cluster, s3, bucket,
                                                                                       pixel_model):
    """The official LDM form (zoo latentdiff_wrapper.py:24, 204-212; …_langevin_300.cfg:9-10): sampler
    method ddim, eta 0 (z = x_T), guide.chain_steps 2 inside the chain, the image decoded on
    sampler.steps 6. The stored z is a DDIM latent on the long grid and decodes to the image."""
    from pipeline.diffusion import ddim_decode
    from pipeline.diffusion.latent import Latent

    name, opts = bucket
    cfg = config(name, opts, pixel_model, guide={"count": 2, "chain_steps": 2},
                 sampler={"method": "ddim", "steps": 6, "eta": 0.0, "seed": 5, "clip_x0": "off"})
    summary = run_job(cfg, "guide")
    assert summary["images"] == 2 and summary["guide"]["decoder"] == "ddim" and summary["guide"]["chain_steps"] == 2

    den = load_denoiser(str(pixel_model), device="cpu")
    den.schedule = den.schedule.with_x0_clip("off")
    long, short = den.schedule.grid(6), den.schedule.grid(2)
    samples = dict(_samples(s3, f"{name}/guided/images/guided-00000.tar"))
    prov = json.loads(samples["000000001"]["latentshift.json"])
    assert prov["decoder"] == "ddim" and prov["eta"] == 0.0 and prov["steps"] == 6 and prov["chain_steps"] == 2
    assert prov["timesteps"] == long and prov["clamp"] is True  # hue's default: the demo's clamped energy
    image = np.asarray(Image.open(io.BytesIO(samples["000000001"]["png"])))

    seeds = [sample_seed(5, "000000001")]
    z0 = initial_latent(den, (3, 16, 16), steps=6, eta=0.0, seeds=seeds)
    energy = hue_energy(HUE)
    res = guide(den, z0, lambda x, k: energy(x.clamp(-1, 1), k), steps=LANGEVIN, step_size=0.05, weight=WEIGHT,
                seeds=seeds, chain_timesteps=short)
    again = ((den.to_pixels(res.x0) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(again.astype(int) - image).max() <= 1
    # the same chain on the long grid is another image: the job's chain walked the short one
    on_long = guide(den, z0, lambda x, k: energy(x.clamp(-1, 1), k), steps=LANGEVIN, step_size=0.05,
                    weight=WEIGHT, seeds=seeds)
    other = ((den.to_pixels(on_long.x0) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(other.astype(int) - image).max() > 1

    z = dict(read_latents(f"s3://{name}/guided/latents/", opts))["000000001"]
    assert z.method == "ddim" and z.timesteps == long and z.noise.shape[0] == 0
    stored = Latent(torch.from_numpy(z.x_start)[None], torch.zeros(1, 0, 3, 16, 16), z.timesteps, "ddim", 0.0)
    decoded = ((ddim_decode(den, stored) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(decoded.astype(int) - image).max() <= 1


@pytest.mark.parametrize(("guide", "sections", "key"), [
    ({"energy": "clip", "text": "a cat"}, {}, "clip.pretrained"),
    ({"energy": "clip"}, {"clip": {"pretrained": "__file__"}}, "guide.text"),
    ({"energy": "clip", "text": "a cat"}, {"clip": {"pretrained": "/nonexistent/clip.safetensors"}},
     "clip.pretrained"),
    # method ddim is the η = 0 walk of z = x_T: an η > 0 there would need noise maps z does not have
    ({}, {"sampler": {"method": "ddim", "eta": 0.5}}, "sampler.eta"),
    # a DPM latent holds one ε per step of sampler.steps: its chain cannot walk another grid
    ({"chain_steps": 2}, {"sampler": {"method": "dpm", "steps": STEPS, "eta": 1.0}}, "guide.chain_steps"),
])
def test_a_bad_config_names_the_key_before_any_work(s3, bucket, pixel_model, guide, sections, key):
    name, opts = bucket
    if sections.get("clip", {}).get("pretrained") == "__file__":
        sections = {"clip": {"pretrained": __file__}}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_job(config(name, opts, pixel_model, guide=guide, **sections), "guide")
    assert not s3.exists(f"{name}/guided/images")
