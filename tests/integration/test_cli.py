"""The installed console script, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def latentshift(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("latentshift", path=str(Path(sys.executable).parent)) or "latentshift"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    out = latentshift("--help")
    assert out.returncode == 0 and "config" in out.stdout


def test_config_prints_the_resolved_config():
    out = latentshift("config", "--config", str(ROOT / "configs" / "afhq-cat2dog.yaml"),
                      "--set", "sampler.steps=20", "--set", "target.condition=null")
    assert out.returncode == 0, out.stderr
    body = yaml.safe_load(out.stdout)
    assert body["sampler"]["steps"] == 20 and body["sampler"]["eta"] == 0.1
    assert body["source"]["model"] == "s3://my-models/ddpm-afhq-cat"
    assert out.stdout.startswith("# config hash ")


def test_config_error_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sampler: {eta: -1}\n")
    out = latentshift("config", "--config", str(cfg))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines == ["latentshift: config error: sampler.eta = -1: Input should be greater than or equal to 0"]


def test_shards_pack_and_ls(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(src / f"{i}.png")
    out = latentshift("shards", "pack", str(src), str(tmp_path / "shards"), "--per-shard", "2")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 3
    ls = latentshift("shards", "ls", str(tmp_path / "shards"))
    assert ls.returncode == 0 and [line.split("\t")[1] for line in ls.stdout.splitlines()] == ["2", "2", "1"]


def test_job_entrypoints_are_the_cli(tmp_path):
    for job in ("translate", "encode", "decode"):
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "--config" in out.stdout and "--overwrite" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: {strength: 2}\n")
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "translate.py"), "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "sampler.strength = 2" in out.stderr
