"""A small committed output for the gallery's tests, written directly as a run leaves it (images tar with
provenance members, ledger records, a scores Parquet, rejects of the job and of the score job, a run
record) plus the input shards, with the hostile data users' keys and prompts may hold."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from shard_builders import png, tar_bytes

HOSTILE_KEY = "<img src=x onerror=alert(1)>"
HOSTILE_PROMPT = "a dog </script><script>alert(2)</script> <b>bold</b>"
OUTPUT_SIZE = (32, 48)  # (height, width) of the output images: wider than tall
# clip_score of s0's samples by position: not in input order, so a sort is seen; the last is unscored
CLIP = [0.20, 0.35, 0.10, 0.30, 0.25]


def picture(seed: int, hw: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def s0_keys() -> list[str]:
    return ["s0-000", HOSTILE_KEY, "s0-002", "s0-003", "s0-004", "s0-005"]


def committed_output(put: Callable[[str, bytes], None], output: str, inputs: str, committed_at: float = 1000.0,
                     seed: int = 0) -> dict:
    """Write the output under ``output`` and the input shards under ``inputs`` with ``put(path, bytes)``.

    s0: six samples (one with the hostile key, one with a further image member ``scale1.png``), scored
    (five of six), one reject of the job and one of the score job; s1: every sample rejected (no images tar).
    Returns what a test checks against."""
    from pipeline.data.scores import score_row, scores_to_bytes

    keys = s0_keys()
    samples, inputs_s0 = [], []
    for i, key in enumerate(keys):
        provenance = {"job": "translate", "config_hash": "abc123", "source_model": "m/src", "target_model": "m/tgt",
                      "target_condition": HOSTILE_PROMPT, "key": key, "source_shard": "s0", "timesteps": [3, 1],
                      "sample_seed": 7 + i, "latent_rows": 0, "psnr": 20.0 + i if i != 2 else None, "ssim": 0.5}
        members = {"png": png(picture(seed + i, OUTPUT_SIZE)), "latentshift.json": json.dumps(provenance).encode(),
                   "txt": f"caption {i} </script><i>x</i>".encode()}
        if i == 3:
            members["scale1.png"] = png(picture(seed + 100 + i, OUTPUT_SIZE))
        samples.append((key, members))
        inputs_s0.append((key, {"png": png(picture(seed + 200 + i, (20, 20))), "txt": b"in"}))
    put(f"{output}/images/s0.tar", tar_bytes(samples))
    put(f"{inputs}/s0.tar", tar_bytes(inputs_s0))
    put(f"{inputs}/s1.tar", tar_bytes([("s1-000", {"png": png(picture(seed + 300, (20, 20)))})]))
    put(f"{output}/scores/s0.parquet", scores_to_bytes(
        [score_row(key=k, shard="s0", clip_score=c, directional=c / 2) for k, c in zip(keys, CLIP, strict=False)]))
    put(f"{output}/_rejects/s0.jsonl", json.dumps(
        {"shard": "s0", "key": "bad</td><script>alert(3)</script>", "member": "bad.png", "index": 6,
         "reason": "cannot decode <svg onload=alert(4)>"}).encode() + b"\n")
    put(f"{output}/_score/_rejects/s0.jsonl", json.dumps(
        {"shard": "s0", "key": "s0-009", "member": "", "index": 9, "reason": "input image missing"}).encode() + b"\n")
    put(f"{output}/_rejects/s1.jsonl", json.dumps(
        {"shard": "s1", "key": "s1-000", "member": "s1-000.png", "index": 0, "reason": "too small"}).encode() + b"\n")
    for shard in ("s0", "s1"):
        put(f"{output}/_ledger/{shard}.json", json.dumps({"shard": shard, "committed_at": committed_at}).encode())
    put(f"{output}/_ledger/runs/20240101-000000-aaaaaa.json", json.dumps({"job": "translate", "run_id": "old"}).encode())
    put(f"{output}/_ledger/runs/20240102-000000-bbbbbb.json",
        json.dumps({"job": "translate", "run_id": "20240102-000000-bbbbbb", "images": 6}).encode())
    return {"keys": keys, "clip": CLIP}


def local_put(path: str, data: bytes) -> None:
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
