"""``latentshift bench``: how much of the model's speed the pipeline delivers.

Runs the translate pipeline on N generated images and prints, for the same config:
  pipeline      images/s end to end (read → decode → model → write → commit)
  bare loop     images/s of the same model calls in-process over the same batches
  efficiency    pipeline / bare loop
  per-image     images/s of the batch-1 loop (as the papers' reference code runs)
  peak memory   the driver's and the largest Ray worker's resident memory
Figures, not asserts: run it on the machine you care about.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _generate_shards(folder: Path, n: int, size: int, per_shard: int) -> None:
    import io

    from PIL import Image

    from pipeline.data.shards import write_samples

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        samples = []
        for i in range(s, min(n, s + per_shard)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
            samples.append((f"img{i:07d}", {"png": buf.getvalue()}))
        with open(folder / f"bench-{s // per_shard:05d}.tar", "wb") as f:
            write_samples(f, samples)


class _PeakRSS:
    """Samples resident memory of this process and of Ray's worker processes."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if "ray::" in (p.info.get("name") or "") or "default_worker.py" in cmd:
                    mem = p.info.get("memory_info")
                    if mem:
                        self.worker = max(self.worker, mem.rss)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _bare_loop(cfg, n: int, batch_size: int) -> float:
    """images/s of encode + decode in-process over batches of ``batch_size``."""
    import torch

    from pipeline.diffusion import sample_seed
    from pipeline.stages.codec import TranslateStage

    stage = TranslateStage(source=cfg.source, target=cfg.target, sampler=cfg.sampler, output=cfg.output,
                           dtype=cfg.runtime.dtype)
    size = cfg.image.size
    x_all = torch.rand(n, 3, size, size) * 2 - 1
    start = time.perf_counter()
    for b in range(0, n, batch_size):
        x = x_all[b : b + batch_size]
        z = stage.encode(x, [sample_seed(0, str(b + i)) for i in range(len(x))])
        stage.decode(z)
    return n / (time.perf_counter() - start)


def run_bench(cfg, images: int = 64, per_shard: int = 16, out=None) -> dict:
    import sys

    from pipeline.jobs import run_job

    out = out or sys.stdout
    cfg.require("source.model", "target.model")
    with tempfile.TemporaryDirectory(prefix="latentshift-bench-") as tmp:
        tmp = Path(tmp)
        _generate_shards(tmp / "in", images, cfg.image.size, per_shard)
        job = cfg.model_copy(deep=True)
        job.input.uri, job.input.storage_options = str(tmp / "in"), {}
        job.output.uri, job.output.storage_options = str(tmp / "out"), {}
        with _PeakRSS() as mem:
            summary = run_job(job, "translate", out=open("/dev/null", "w"))  # noqa: SIM115
        pipeline_ips = summary["images"] / summary["seconds"]
        bare = _bare_loop(job, images, cfg.runtime.batch_size)
        single = _bare_loop(job, min(images, 8), 1)
    result = {
        "images": images, "image_size": cfg.image.size, "batch_size": cfg.runtime.batch_size,
        "steps": cfg.sampler.steps, "strength": cfg.sampler.strength,
        "pipeline_images_per_s": round(pipeline_ips, 3), "bare_loop_images_per_s": round(bare, 3),
        "efficiency": round(pipeline_ips / bare, 3) if bare else None,
        "per_image_loop_images_per_s": round(single, 3),
        "peak_rss_driver_mb": round(mem.driver / 2**20), "peak_rss_worker_mb": round(mem.worker / 2**20),
        "latent_bytes_per_image": summary.get("latent_bytes_per_image"),
    }
    out.write(
        f"bench: {images} images {cfg.image.size}px, batch {cfg.runtime.batch_size}, "
        f"{cfg.sampler.steps} steps × strength {cfg.sampler.strength}\n"
        f"  pipeline end to end   {result['pipeline_images_per_s']:>9.3f} images/s (includes Ray start and model loads)\n"
        f"  bare in-process loop  {result['bare_loop_images_per_s']:>9.3f} images/s\n"
        f"  efficiency            {result['efficiency']:>9.3f}\n"
        f"  per-image loop (b=1)  {result['per_image_loop_images_per_s']:>9.3f} images/s\n"
        f"  peak RSS              driver {result['peak_rss_driver_mb']} MB, largest Ray worker {result['peak_rss_worker_mb']} MB\n"
        f"  latents               {result['latent_bytes_per_image']} bytes per image (Parquet, zstd)\n"
    )
    out.write(json.dumps(result) + "\n")
    return result
