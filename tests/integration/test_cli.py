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
