"""``latentshift bench``: what a GPU owner asks of the translate pipeline, in figures.

Runs the translate job on N generated images, with every model-stage actor logging where each
batch's time went (``pipeline.data.profile``) and NVML sampling the GPU, then the same model
calls in-process, then (for a Stable-Diffusion-shaped zero-shot config) diffusers' own
``CycleDiffusionPipeline`` on the same model, images and settings. It prints:

  pipeline      images/s end to end (Ray start, model loads, read → model → write → commit)
                and in steady state (from the end of the first model batch to the end of the last)
  first batch   seconds from the start of the run to the end of the first model batch; model load
  actor split   per batch: device work vs host work vs waiting for the device lock; the share of
                the steady window the device section was busy (host work overlapped when ≈ 1)
  GPU busy      NVML utilisation over the run and in steady state (GPU only)
  bare loop     images/s of the same stage's device work in-process, after a warm-up batch
  efficiency    pipeline steady state / bare loop
  per-image     images/s of the batch-1 loop (as the papers' reference code runs), and batched / it
  peer          diffusers CycleDiffusionPipeline images/s, and the bare loop / it
  memory        peak GPU memory in-process (torch) and over the pipeline (NVML); peak host RSS

``--random SHAPE`` benchmarks random-weight models of real shapes (``ddpm-256``: two models, the
AFHQ-style translation; ``sd-1``: one SD-1.x model, zero-shot with prompts) or tiny ones for a
CPU smoke run. Figures, never asserts: run it on the machine you care about.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# --random: the settings of the measurements (translate, η = 0.1, strength 0.8)
RANDOM_SETUPS = {
    "ddpm-256": {"models": 2, "steps": 100, "batch": 32, "prompts": None, "guidance": (1.0, 1.0)},
    "sd-1": {"models": 1, "steps": 50, "batch": 8, "prompts": ("a photo of a cat", "a photo of a dog"),
             "guidance": (1.0, 2.0)},
    "tiny-pixel": {"models": 2, "steps": 20, "batch": 16, "prompts": None, "guidance": (1.0, 1.0)},
    "tiny-sd": {"models": 1, "steps": 10, "batch": 4, "prompts": ("a cat", "a dog"), "guidance": (1.0, 2.0)},
}


def random_config(shape: str, folder: Path, overrides=()):
    """A translate config over freshly built random-weight models of ``shape`` (see RANDOM_SETUPS)."""
    from pipeline.config import load_config
    from pipeline.tools.random_models import image_size, save_random_model

    setup = RANDOM_SETUPS[shape]
    src = save_random_model(folder / f"{shape}-a", shape, seed=0)
    tgt = save_random_model(folder / f"{shape}-b", shape, seed=1) if setup["models"] == 2 else src
    prompts = setup["prompts"] or (None, None)
    base = [f"source.model={src}", f"target.model={tgt}", f"image.size={image_size(shape)}",
            f"sampler.steps={setup['steps']}", "sampler.eta=0.1", "sampler.strength=0.8",
            f"runtime.batch_size={setup['batch']}", "output.latents=start",
            f"source.guidance_scale={setup['guidance'][0]}", f"target.guidance_scale={setup['guidance'][1]}"]
    if prompts[0]:
        base += [f"source.condition={json.dumps(prompts[0])}", f"target.condition={json.dumps(prompts[1])}"]
    return load_config(None, [*base, *overrides])


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


def profile_figures(lines: list[dict], run_start: float) -> dict:
    """Time to first batch, steady-state rate and the actor's device/host split, from the profile."""
    batches = sorted((r for r in lines if r["event"] == "batch" and r["samples"] > 0), key=lambda r: r["end"])
    loads = [r for r in lines if r["event"] == "load"]
    out: dict = {"batches": len(batches)}
    if loads:
        out["model_load_s"] = round(max(r["end"] - r["start"] for r in loads), 2)
        out["models_loaded_after_s"] = round(min(r["end"] for r in loads) - run_start, 2)
    if not batches:
        return out
    first_end, last_end = batches[0]["end"], batches[-1]["end"]
    out["time_to_first_batch_s"] = round(first_end - run_start, 2)
    device, host, wait = (sum(r[k] for r in batches) for k in ("device_s", "host_s", "wait_s"))
    n = len(batches)
    out.update(device_s_per_batch=round(device / n, 4), host_s_per_batch=round(host / n, 4),
               wait_s_per_batch=round(wait / n, 4), host_share=round(host / (host + device), 3))
    split = [r["device_rows"] for r in batches if r.get("device_rows")]
    if split:  # a batch did not fit on the device: the rows per call the actor settled on (ModelStage.fitting)
        out["device_rows"] = min(split)
    if n > 1 and last_end > first_end:
        steady = batches[1:]
        window = last_end - first_end
        out["steady_window"] = (first_end, last_end)
        out["steady_images_per_s"] = round(sum(r["samples"] for r in steady) / window, 3)
        # the share of the steady window some batch was in its device section: ≈ 1 when host work is overlapped
        out["device_section_busy"] = round(min(1.0, sum(r["device_s"] for r in steady) / window), 3)
    return out


def _bare_loop(stage, size: int, n: int, batch_size: int) -> tuple[float, float | None]:
    """images/s of the stage's device work in-process over batches of ``batch_size`` (after one warm-up
    batch: compile and caches), and the peak GPU memory in MB (None on CPU)."""
    import torch

    from pipeline.diffusion import sample_seed
    from pipeline.stages.tensors import to_uint8

    dev = stage.source.device
    x_all = (torch.rand(max(n, batch_size), 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1)

    def one(b: int, x):
        z, out = stage.run(x.to(dev), [sample_seed(0, str(b + i)) for i in range(len(x))])
        return to_uint8(out) if out is not None else z.x_start.cpu()

    one(0, x_all[:batch_size])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in range(0, n, batch_size):
        one(b, x_all[b : b + batch_size])
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return n / seconds, peak


def _attention(den) -> str:
    """Which attention the UNet runs (diffusers' AttnProcessor2_0 is torch SDPA: flash / memory-efficient kernels)."""
    unet = getattr(den.unet, "_orig_mod", den.unet)  # a compiled UNet wraps the module
    procs = {type(m.processor).__name__ for m in unet.modules() if hasattr(m, "processor")}
    return ", ".join(sorted(procs)) or "none"


def run_bench(cfg, images: int = 64, per_shard: int = 16, out=None, peer: bool = True) -> dict:
    from pipeline.data.profile import ENV, read_profile
    from pipeline.jobs import run_job
    from pipeline.stages.codec import TranslateStage
    from pipeline.tools.gpu_monitor import GpuMonitor

    out = out or sys.stdout
    cfg.require("source.model", "target.model")
    rt, s = cfg.runtime, cfg.sampler
    with tempfile.TemporaryDirectory(prefix="latentshift-bench-") as tmp:
        tmp = Path(tmp)
        _generate_shards(tmp / "in", images, cfg.image.size, per_shard)
        job = cfg.model_copy(deep=True)
        job.input.uri, job.input.storage_options = str(tmp / "in"), {}
        job.output.uri, job.output.storage_options = str(tmp / "out"), {}
        (tmp / "profile").mkdir()
        import ray

        if ray.is_initialized():
            raise RuntimeError("latentshift bench starts its own local Ray (its actors must inherit the profile "
                               "folder); run it in a fresh process")
        saved = {k: os.environ.get(k) for k in (ENV, "RAY_ADDRESS")}
        # a fresh local Ray, even on a node of a running cluster: its workers inherit this environment
        os.environ.update({ENV: str(tmp / "profile"), "RAY_ADDRESS": "local"})
        try:
            with GpuMonitor() as gpu, _PeakRSS() as mem:
                run_start, mono_start = time.time(), time.monotonic()
                summary = run_job(job, "translate", out=open(os.devnull, "w"))  # noqa: SIM115
                run_end = time.time()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        prof = profile_figures(read_profile(tmp / "profile"), run_start)

    def mono(t: float) -> float:  # profile wall-clock → the monitor's monotonic clock
        return mono_start + (t - run_start)

    steady = prof.pop("steady_window", None)
    result = {"images": images, "image_size": cfg.image.size, "batch_size": rt.batch_size, "steps": s.steps,
              "strength": s.strength, "eta": s.eta, "dtype": rt.dtype, "compile": rt.compile,
              "pipeline_images_per_s": round(summary["images"] / (run_end - run_start), 3), **prof,
              "gpu_busy": gpu.busy(), "gpu_busy_steady": gpu.busy(mono(steady[0]), mono(steady[1])) if steady else None,
              "gpu_peak_memory_pipeline_mb": gpu.peak_memory_mb(),
              "peak_rss_driver_mb": round(mem.driver / 2**20), "peak_rss_worker_mb": round(mem.worker / 2**20)}

    stage = TranslateStage(source=job.source, target=job.target, sampler=job.sampler, output=job.output,
                           dtype=rt.dtype, compile=rt.compile)
    result["device"] = _device_name(stage.source.device)
    result["attention"] = _attention(stage.source)
    result["unet_calls_per_image"] = _unet_calls(stage)
    bare, peak = _bare_loop(stage, cfg.image.size, images, rt.batch_size)
    single, _ = _bare_loop(stage, cfg.image.size, min(images, 4), 1)
    result.update(bare_loop_images_per_s=round(bare, 3), gpu_peak_memory_bare_mb=peak and round(peak),
                  per_image_loop_images_per_s=round(single, 3), batched_over_per_image=round(bare / single, 2))
    steady_ips = result.get("steady_images_per_s")
    result["efficiency"] = round(steady_ips / bare, 3) if steady_ips else None
    if peer and _zero_shot(job):
        result["peer"] = _peer(job, images, stage.source.device)
        result["bare_over_peer"] = round(bare / result["peer"]["images_per_s"], 2)
        if result["peer"]["batch_size"] == 1:  # the peer at batch 1 (guided), against ours at batch 1
            result["per_image_over_peer"] = round(single / result["peer"]["images_per_s"], 2)
    out.write(report(result))
    out.write(json.dumps(result) + "\n")
    return result


def _zero_shot(cfg) -> bool:
    """A CycleDiffusionPipeline peer exists for one text-conditioned model translating prompt to prompt."""
    return (cfg.source.model == cfg.target.model and isinstance(cfg.source.condition, str)
            and isinstance(cfg.target.condition, str) and cfg.sampler.method == "dpm")


def _peer(cfg, images: int, device) -> dict:
    import torch

    from pipeline.data.model_store import resolve_model
    from pipeline.tools.peer import cycle_diffusion_images_per_s

    folder = resolve_model(cfg.source.model, cfg.source.storage_options, allow_pickle=cfg.source.allow_pickle)
    size = cfg.image.size
    x = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = cfg.sampler
    return cycle_diffusion_images_per_s(
        folder.path, x, source_prompt=cfg.source.condition, target_prompt=cfg.target.condition, steps=s.steps,
        strength=s.strength, eta=s.eta, guidance_scale=cfg.target.guidance_scale,
        source_guidance_scale=cfg.source.guidance_scale, batch_size=cfg.runtime.batch_size, device=device,
        dtype=cfg.runtime.dtype)


def _unet_calls(stage) -> int:
    """UNet calls per image at this config: encode + decode steps, or one walk in lockstep (one model)."""
    k = len(stage.source.schedule.grid(stage.sampler.steps, stage.sampler.strength))
    lockstep = stage.source is stage.target and stage.sampler.method == "dpm"
    return k * (1 if lockstep else 2) + stage.sampler.refine_steps


def _device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def report(r: dict) -> str:
    def f(key, unit="", fmt="{:.3f}"):
        v = r.get(key)
        return "n/a" if v is None else fmt.format(v) + unit

    lines = [
        f"bench: {r['images']} images {r['image_size']}px, batch {r['batch_size']}, {r['steps']} steps × strength "
        f"{r['strength']}, η {r['eta']}, {r['unet_calls_per_image']} UNet calls/image, dtype {r['dtype']}, "
        f"compile {r['compile']} — on {r['device']} (attention: {r['attention']})",
        f"  pipeline end to end    {f('pipeline_images_per_s', ' images/s')} (includes Ray start and model loads)",
        f"  pipeline steady state  {f('steady_images_per_s', ' images/s')}",
        f"  time to first batch    {f('time_to_first_batch_s', ' s', '{:.1f}')} (models loaded after "
        f"{f('models_loaded_after_s', ' s', '{:.1f}')}, load took {f('model_load_s', ' s', '{:.1f}')})",
        f"  actor, per batch       device {f('device_s_per_batch', ' s')}, host {f('host_s_per_batch', ' s')}, "
        f"waiting for the device {f('wait_s_per_batch', ' s')}; device section busy "
        f"{f('device_section_busy', '', '{:.0%}')} of the steady window"
        + (f"; batches did not fit the device: {r['device_rows']} rows per call" if r.get("device_rows") else ""),
        f"  GPU busy (NVML)        {f('gpu_busy', '', '{:.0%}')} over the run, {f('gpu_busy_steady', '', '{:.0%}')} in steady state",
        f"  bare in-process loop   {f('bare_loop_images_per_s', ' images/s')}",
        f"  efficiency             {f('efficiency', '', '{:.0%}')} (steady state / bare loop)",
        f"  per-image loop (b=1)   {f('per_image_loop_images_per_s', ' images/s')}; batched is "
        f"{f('batched_over_per_image', '×', '{:.1f}')}",
    ]
    if "peer" in r:
        equal = (f", at batch 1 too: {r['per_image_over_peer']:.2f}× it" if "per_image_over_peer" in r else "")
        lines.append(f"  diffusers CycleDiffusionPipeline  {r['peer']['images_per_s']:.3f} images/s at batch "
                     f"{r['peer']['batch_size']}; bare loop is {r['bare_over_peer']:.2f}× it{equal}")
    lines.append(f"  GPU memory peak        {f('gpu_peak_memory_bare_mb', ' MB', '{:.0f}')} in-process, "
                 f"{f('gpu_peak_memory_pipeline_mb', ' MB', '{:.0f}')} over the pipeline (NVML)")
    lines.append(f"  host RSS peak          driver {r['peak_rss_driver_mb']} MB, largest Ray worker "
                 f"{r['peak_rss_worker_mb']} MB")
    return "\n".join(lines) + "\n"
