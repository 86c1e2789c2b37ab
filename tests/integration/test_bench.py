"""``latentshift bench --random tiny-*`` as a user runs it: the report and its JSON line, on CPU.

Run as a subprocess, as a user runs it: the bench starts a local Ray of its own (it sets
``RAY_ADDRESS=local``) so that its actors inherit the profile folder through the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def bench(*args: str) -> tuple[str, dict]:
    exe = Path(sys.executable).parent / "latentshift"
    proc = subprocess.run([str(exe), "bench", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    *report, last = proc.stdout.strip().splitlines()
    return "\n".join(report), json.loads(last)


def test_bench_of_two_tiny_pixel_models():
    """Two models (encode with one, decode with the other): 2 × 16 UNet calls an image (20 steps ×
    strength 0.8 → 16 timesteps); two batches of 8, so a steady state exists; no GPU here."""
    text, r = bench("--random", "tiny-pixel", "--images", "16", "--per-shard", "8", "--set", "runtime.batch_size=8")
    assert r["images"] == 16 and r["batch_size"] == 8 and r["steps"] == 20 and r["strength"] == 0.8
    assert r["batches"] >= 2
    assert r["pipeline_images_per_s"] > 0 and r["steady_images_per_s"] > 0 and r["time_to_first_batch_s"] > 0
    assert r["bare_loop_images_per_s"] > 0 and r["efficiency"] > 0
    assert r["gpu_busy"] is None and r["gpu_busy_steady"] is None and r["device"].startswith("cpu")
    assert r["unet_calls_per_image"] == 32
    assert "peer" not in r  # two unconditional models: no CycleDiffusionPipeline peer
    assert "steady state" in text and "time to first batch" in text
    assert "32 UNet calls/image" in text


def test_bench_of_a_tiny_sd_model_zero_shot_with_its_peer():
    """One text model, prompt to prompt: encoder and decoder in lockstep, one UNet call a step
    (10 steps × 0.8 → 8); diffusers' CycleDiffusionPipeline runs as the peer, guided (target
    guidance 2), so at batch 1, and is compared with our batch-1 loop too."""
    text, r = bench("--random", "tiny-sd", "--images", "8", "--per-shard", "4", "--set", "runtime.batch_size=4")
    assert r["unet_calls_per_image"] == 8
    assert r["steady_images_per_s"] > 0 and r["bare_loop_images_per_s"] > 0
    peer = r["peer"]
    assert peer["images_per_s"] > 0 and peer["images"] == 8 and peer["all_finite"]
    assert peer["batch_size"] == 1 and peer["requested_batch_size"] == 4
    assert r["bare_over_peer"] > 0 and r["per_image_over_peer"] > 0
    assert "diffusers CycleDiffusionPipeline" in text and "at batch 1 too" in text
