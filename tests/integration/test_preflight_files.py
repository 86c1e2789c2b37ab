"""Every job fails before Ray, in one line (issue 24), at the CLI: a file a job would read that does not
load or does not fit (CLIP checkpoints, direction files, LPIPS files, example sets, a model of the wrong
kind) and a configuration that would do nothing it asked for end with exit 2, exactly one
``latentshift:`` line naming the key and the file, no traceback, and Ray never started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from shard_builders import good_samples, tar_bytes

from pipeline.cli import main
from pipeline.data.directions import write_direction
from pipeline.data.model_store import resolve_model
from pipeline.stages.hspace import mid_block_sizes
from pipeline.tools.random_clip import save_random_clip, save_random_lpips

LATENTSHIFT = Path(sys.executable).with_name("latentshift")


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the run gets as far as starting Ray."""
    import pipeline.runtime.ray_env as ray_env

    started = []
    monkeypatch.setattr(ray_env, "init_ray", lambda *a, **k: started.append(1) or pytest.fail("Ray was started"))
    yield started


def refused(tmp_path, capsys, command: list[str], cfg: dict, *needles: str) -> str:
    """Run ``latentshift COMMAND --config`` in this process; the one line it ends with, checked."""
    import ray

    before = ray.is_initialized()
    path = tmp_path / f"cfg-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(json.dumps(cfg))
    started = time.monotonic()
    code = main([*command, "--config", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("latentshift:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert ray.is_initialized() == before
    assert time.monotonic() - started < 60
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def truncated(path, dest) -> str:
    data = Path(path).read_bytes()
    Path(dest).write_bytes(data[: len(data) // 2])
    return str(dest)


def with_shards(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "shard-0.tar").write_bytes(tar_bytes(good_samples(0, 2)))


# ---- CLIP checkpoints (score; search and guide share the check) -------------------------------


def score_config(tmp_path, clip_model, pretrained, **clip) -> dict:
    return {"output": {"uri": str(tmp_path / "out")}, "score": {"target_text": "a dog"},
            "clip": {"model": clip_model, "pretrained": pretrained, **clip}}


def test_score_with_a_truncated_clip_checkpoint(tmp_path, capsys, no_ray, clip_files):
    config, weights = clip_files
    bad = truncated(weights, tmp_path / "clip.safetensors")
    refused(tmp_path, capsys, ["score"], score_config(tmp_path, config, bad), "clip.pretrained", bad, "truncated")


def test_score_with_a_truncated_clip_checkpoint_in_s3(tmp_path, capsys, no_ray, clip_files, s3, s3_server,
                                                      monkeypatch):
    monkeypatch.setenv("LATENTSHIFT_CACHE", str(tmp_path / "cache"))  # fetched through the actors' model cache
    config, weights = clip_files
    bucket = f"pf-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    s3.pipe(f"{bucket}/clip.safetensors", Path(truncated(weights, tmp_path / "t.safetensors")).read_bytes())
    uri = f"s3://{bucket}/clip.safetensors"
    line = refused(tmp_path, capsys, ["score"],
                   score_config(tmp_path, config, uri, storage_options={"endpoint_url": s3_server}),
                   f"clip.pretrained {uri!r}", "truncated")
    assert "lsTestSecret" not in line


def test_score_with_a_pickle_clip_checkpoint(tmp_path, capsys, no_ray, clip_files):
    config, weights = clip_files
    pickled = tmp_path / "clip.bin"
    shutil.copy(weights, pickled)
    refused(tmp_path, capsys, ["score"], score_config(tmp_path, config, str(pickled)),
            "clip.pretrained", str(pickled), "pickle")


def test_score_with_a_clip_model_that_does_not_fit_the_weights(tmp_path, capsys, no_ray, clip_files):
    _, weights = clip_files
    refused(tmp_path, capsys, ["score"], score_config(tmp_path, "ViT-B-16-quickgelu", weights),
            "clip.model 'ViT-B-16-quickgelu'", weights)


# ---- direction files, scales and t_edit (edit) ------------------------------------------------


def edit_config(tmp_path, model, **hspace) -> dict:
    return {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
            "source": {"model": str(model)}, "image": {"size": 16},
            "hspace": {"direction": str(tmp_path / "dir.safetensors"), "t0": 999, "steps": 8, **hspace}}


def table_direction(path, channels: int, model: str, t_edit: int = 500) -> None:
    write_direction(str(path), {}, {"deltas": np.zeros((8, channels, 2, 2), np.float32)},
                    {"kind": "table", "model": model, "timesteps": [int(t) for t in np.linspace(875, 0, 8)],
                     "t0": 875, "steps": 8, "grid": "schedule", "t_edit": t_edit, "t_boost": 200})


def test_edit_with_a_direction_fitted_on_another_model(tmp_path, capsys, no_ray, pixel_model):
    with_shards(tmp_path, "in")
    channels, _ = mid_block_sizes(resolve_model(str(pixel_model)))
    table_direction(tmp_path / "dir.safetensors", 2 * channels, "other-model")
    refused(tmp_path, capsys, ["edit"], edit_config(tmp_path, pixel_model), "hspace.direction",
            str(tmp_path / "dir.safetensors"), f"h of {2 * channels} channels", f"has {channels}")


def test_edit_with_t_edit_above_t0(tmp_path, capsys, no_ray, pixel_model):
    with_shards(tmp_path, "in")
    channels, _ = mid_block_sizes(resolve_model(str(pixel_model)))
    table_direction(tmp_path / "dir.safetensors", channels, str(pixel_model))
    refused(tmp_path, capsys, ["edit"], edit_config(tmp_path, pixel_model, t_edit=800, t0=300),
            "hspace.t_edit = 800", "no step would be edited")
    assert not (tmp_path / "out").exists()  # refused before the output is touched


def test_edit_with_scales_of_only_zero(tmp_path, capsys, no_ray, pixel_model):
    with_shards(tmp_path, "in")
    refused(tmp_path, capsys, ["edit"], edit_config(tmp_path, pixel_model, scales=[0, 0.0]), "hspace.scales")


# ---- example sets and LPIPS files (direction fit) ---------------------------------------------


def test_direction_fit_with_an_empty_example_set_in_s3(tmp_path, capsys, no_ray, pixel_model, s3, s3_server):
    bucket, opts = f"pf-{uuid.uuid4().hex[:10]}", {"endpoint_url": s3_server}
    s3.mkdir(bucket)
    s3.pipe(f"{bucket}/blue/shard-0.tar", tar_bytes(good_samples(0, 2)))
    s3.pipe(f"{bucket}/red/readme.txt", b"no shards here")
    cfg = {"input": {"uri": f"s3://{bucket}/blue/", "storage_options": opts},
           "output": {"uri": f"s3://{bucket}/out", "storage_options": opts}, "source": {"model": str(pixel_model)},
           "hspace": {"direction": f"s3://{bucket}/dir.safetensors", "direction_storage_options": opts,
                      "examples": f"s3://{bucket}/red/", "t0": 999, "steps": 8}, "image": {"size": 16}}
    line = refused(tmp_path, capsys, ["direction", "fit"], cfg, f"hspace.examples s3://{bucket}/red/", "no .tar shards")
    assert "input.uri" not in line


def test_direction_fit_with_a_missing_lpips_file(tmp_path, capsys, no_ray, pixel_model):
    with_shards(tmp_path, "in", "red")
    missing = str(tmp_path / "no-lpips.safetensors")
    cfg = edit_config(tmp_path, pixel_model, examples=str(tmp_path / "red"), lpips=missing, t_edit="auto")
    line = refused(tmp_path, capsys, ["direction", "fit"], cfg, "hspace.lpips", missing)
    assert "model" not in line.split("hspace.lpips", 1)[0]  # blamed on the LPIPS key, not the diffusion model


def test_direction_fit_with_an_lpips_file_of_another_net(tmp_path, capsys, no_ray, pixel_model):
    with_shards(tmp_path, "in", "red")
    lpips = save_random_lpips(tmp_path / "lpips-alex.safetensors")
    cfg = edit_config(tmp_path, pixel_model, examples=str(tmp_path / "red"), lpips=lpips, lpips_net="squeeze")
    refused(tmp_path, capsys, ["direction", "fit"], cfg, "hspace.lpips", lpips, "not LPIPS-squeeze")


# ---- model kinds and skips (search) -----------------------------------------------------------


def search_config(tmp_path, model, clip_files, **search) -> dict:
    config, weights = clip_files
    return {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
            "source": {"model": str(model), "condition": "a cat"}, "target": {"condition": "a dog"},
            "sampler": {"method": "dpm", "steps": 4, "eta": 0.1},
            "search": {"trials": 1, "skips": [1], "decoder_scales": [1.0], **search},
            "clip": {"model": config, "pretrained": weights}, "image": {"size": 16}}


def test_search_with_a_pixel_model(tmp_path, capsys, no_ray, pixel_model, clip_files):
    with_shards(tmp_path, "in")
    refused(tmp_path, capsys, ["search"], search_config(tmp_path, pixel_model, clip_files),
            f"source.model {str(pixel_model)!r} is unconditional", "text-conditional")


def test_search_whose_skips_leave_no_step(tmp_path, capsys, no_ray, sd_model, clip_files):
    with_shards(tmp_path, "in")
    refused(tmp_path, capsys, ["search"], search_config(tmp_path, sd_model, clip_files, skips=[4]),
            "search.skips [4]", "sampler.steps = 4")


# ---- the console, as a user sees it ------------------------------------------------------------


def run_cli(tmp_path, *args: str, cfg: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "cli.yaml"
    path.write_text(json.dumps(cfg))
    return subprocess.run([str(LATENTSHIFT), *args, "--config", str(path)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, RAY_ADDRESS=""))


def test_the_console_of_an_edit_that_would_edit_nothing(tmp_path, pixel_model):
    with_shards(tmp_path, "in")
    channels, _ = mid_block_sizes(resolve_model(str(pixel_model)))
    table_direction(tmp_path / "dir.safetensors", channels, str(pixel_model))
    proc = run_cli(tmp_path, "edit", cfg=edit_config(tmp_path, pixel_model, t_edit=800, t0=300))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("latentshift: config error: hspace.t_edit = 800")
    assert "Traceback" not in proc.stderr + proc.stdout and "ray" not in proc.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_guide_with_no_langevin_step_warns_in_one_line(tmp_path, pixel_model):
    """Warned, not refused (the unguided baseline of the guide demo): the run goes on; this one then stops
    at its output, which is a file, so no Ray is started here either."""
    (tmp_path / "a-file").write_text("")
    cfg = {"output": {"uri": str(tmp_path / "a-file" / "out")}, "source": {"model": str(pixel_model)},
           "sampler": {"method": "ddim", "eta": 0, "steps": 4},
           "guide": {"energy": "hue", "count": 2, "langevin_steps": 0, "weight": 100}}
    proc = run_cli(tmp_path, "guide", cfg=cfg)
    warnings = [line for line in proc.stderr.splitlines() if "guide.langevin_steps is 0" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "guide.weight" in warnings[0], proc.stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
