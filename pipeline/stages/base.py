"""What every model stage shares: loading models once per actor, the device lock, and typed rows out.

A model stage is a Ray Data callable class run on an actor pool. It takes the config sections
it needs (never the whole job config), loads its models in ``__init__`` (once per actor), and
turns one numpy batch of rows (``pipeline.data.rows``) into another. With ``runtime.pool`` tasks
it runs in Ray tasks instead, built once per worker process (``stage_in_process``).

A stage that splits a batch into ``prepare`` (host: pick rows, stack arrays), ``compute`` (the
device: every tensor op, results copied back as numpy) and ``emit`` (host: rows out) runs two
batches at once in its actor's threads (``concurrent_batches = 2``, Ray Data's
``max_concurrent_calls_per_actor``): the device lock lets one batch compute at a time, so one
batch's host work and Ray's batching overlap the next batch's device work, and the device never
waits on the host. Only one batch's tensors are on the device at a time.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ClipConfig, ModelConfig, OutputConfig, ScoreConfig
from pipeline.data.model_store import resolve_model
from pipeline.data.profile import StageProfile, now
from pipeline.data.rows import RowBuffer, RowKind, rows_of
from pipeline.diffusion import Denoiser, Latent, load_denoiser, sample_seed
from pipeline.errors import ConfigError, DeviceMemoryError, FileLoadError
from pipeline.metrics.scorer import Scorer, score_texts

MODEL_FIX = "give a complete diffusers model folder whose weights match its configs (download or export it again)"
CLIP_FIX = "give a complete open_clip checkpoint (safetensors) of the architecture clip.model names"
LPIPS_FIX = "write it again with `latentshift lpips-export PATH`"
DIRECTION_FIX = "fit it again with `latentshift direction fit` on this source.model and hspace grid"


@contextmanager
def loading(key: str, file: str, fix: str) -> Iterator[None]:
    """Whatever goes wrong inside (on an actor, loading what config ``key`` names: ``file``) is
    re-raised as one ``FileLoadError``, ``key = file: reason; fix``.

    The run's driver prints that line and nothing else (runtime/models.py: actor_failure), so a
    failure that passed preflight (a file that changed since, a check preflight cannot make)
    still names the key to change; the traceback stays in Ray's logs (and ``--verbose``). A
    ConfigError already names its key and passes unchanged.
    """
    try:
        yield
    except (FileLoadError, ConfigError):
        raise
    except Exception as exc:
        raise FileLoadError(f"{key} = {file}: {load_reason(exc, file).rstrip('.')}; {fix}") from exc


def load_reason(exc: BaseException, file: str) -> str:
    """The reason in one line: a LatentshiftError's own message (less a leading ``model 'file':``, the
    key's line names the file), any other error as ``Type: message``."""
    from pipeline.errors import LatentshiftError

    text = " ".join(str(exc).split())
    if isinstance(exc, LatentshiftError):
        for prefix in (f"model {file!r}: ", f"{file}: "):
            text = text.removeprefix(prefix)
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_model(section: ModelConfig, dtype: str, clip_x0: str = "auto", compile: str = "off",
               key: str = "model") -> Denoiser:
    """A model section → a Denoiser on this actor's device (the source resolved by data/), its
    x̂0 clipping as ``sampler.clip_x0`` says, its UNet compiled as ``runtime.compile`` says.
    ``key`` is the section's name (``source``, ``target``): a failure names ``<key>.model``."""
    with loading(f"{key}.model", section.model, MODEL_FIX):
        folder = resolve_model(section.model, section.storage_options, allow_pickle=section.allow_pickle)
        den = load_denoiser(folder, dtype=dtype, null_class=section.null_class)
    den.schedule = den.schedule.with_x0_clip(clip_x0)
    if compile != "off" and den.device.type == "cuda":  # CPU: compiling costs more than it saves here
        # compiled once per actor, on the first batch; batches keep one shape (ModelStage.padded)
        den.unet = torch.compile(den.unet, mode=compile)
        den.compiled = True
    return den


def load_clip_section(clip, device):
    """The ``clip`` section's open_clip model (checkpoint local or fetched once into the cache), frozen."""
    from pipeline.data.model_cache import materialize_file
    from pipeline.metrics.clip import load_clip

    if not clip.pretrained:
        raise ConfigError("config error: clip.pretrained is not set; give a local or s3:// open_clip checkpoint "
                          "(latentshift never downloads one)")
    with loading("clip.pretrained", clip.pretrained, CLIP_FIX):
        path = materialize_file(clip.pretrained, clip.storage_options)
        return load_clip(clip.model, str(path), device=device, allow_pickle=clip.allow_pickle,
                         antialias=clip.antialias)


def load_scorer(clip: ClipConfig, score: ScoreConfig, source: ModelConfig, target: ModelConfig, device=None,
                directional: bool = True) -> Scorer:
    """The ``clip`` section's CLIP and the texts ``score`` (or the model sections' prompts) name, as a
    ``Scorer`` on ``device`` (``None``: cuda when there is one); without ``directional`` no source text."""
    source_text, target_text = score_texts(score, source, target, directional)
    # float32 whatever runtime.dtype says: scores are measurements, kept comparable across runs and devices
    model = load_clip_section(clip, device if device is not None else "auto")
    return Scorer(model, source_text, target_text, score.templates)


@dataclass
class Work:
    """What an image stage's ``prepare`` hands the device: the sample rows, their seeds, their pixels
    (uint8 (n, H, W, 3) on the host, padded rows last; None when the batch has no sample)."""

    idx: np.ndarray
    seeds: list[int]
    pixels: torch.Tensor | None


@dataclass
class LatentMaps:
    """A batch's latent maps on the host, as ``output.latents`` asks: (B, 1 + K | 1, C, h, w)."""

    maps: np.ndarray
    timesteps: list[int]
    seeds: list[int]

    @classmethod
    def of(cls, z: Latent, output: OutputConfig) -> LatentMaps | None:
        if output.latents == "none":
            return None
        dtype = np.float16 if output.latent_dtype == "float16" else np.float32
        flat, shape = z.to_rows(dtype=dtype, start_only=(output.latents == "start"))
        return cls(flat.reshape(len(z), *shape), list(z.timesteps), list(z.seeds))


_STAGES: dict = {}  # this worker process's stage, by its run's key (stage_in_process)


def stage_in_process(batch: dict, stage_cls: type, sections: dict, key: str, tasks: int = 1) -> dict:
    """``stage_cls(**sections)(batch)`` with the stage built once per worker process and kept for the
    run's next batch (``runtime.pool: tasks``, pipeline/runtime/ray_env.py). ``key`` is the run's own: a
    later run builds its stage again, since what its config names may have changed in between (a stats
    file fitted again, a direction), but in a warm process, its imports done (a Ray task worker outlives
    the run, an actor does not). One stage is kept: a new key replaces it.

    ``tasks`` of the stage run at a time on the node: torch's threads are the node's cores shared among
    them (Ray sets a 1-CPU task's OMP_NUM_THREADS to 1, which would leave the other cores idle)."""
    threads = max(1, (os.cpu_count() or 1) // tasks)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    stage = _STAGES.get(key)
    if stage is None:
        _STAGES.clear()
        gc.collect()
        stage = _STAGES[key] = stage_cls(**sections)
    return stage(batch)


class ModelStage:
    """Base of the actor-pool stages: rejects pass through, latents leave as LATENT rows."""

    concurrent_batches = 1  # 2 for stages written as prepare → compute → emit

    def __init__(self, output: OutputConfig | None = None):
        self.output = output or OutputConfig()
        self.profile = StageProfile(type(self).__name__)
        self._device_lock = threading.Lock()
        self._init_start = now()
        self._fixed_batch = 0
        self.device_rows = 0  # rows per device call once one ran out of memory (``fitting``); 0: the whole batch

    def ready(self) -> None:
        """Called at the end of a subclass's ``__init__``: its models are loaded."""
        self.profile.record("load", start=self._init_start, end=now())

    # ---- the three phases ---------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        start, t0 = now(), time.perf_counter()
        work = self.prepare(batch)
        t1 = time.perf_counter()
        with self._device_lock:
            t2 = time.perf_counter()
            result = self.compute(work)
            t3 = time.perf_counter()
        out = self.emit(batch, work, result)
        t4 = time.perf_counter()
        self.profile.record("batch", start=start, end=now(), rows=len(batch["kind"]),
                            samples=int(len(self.samples(batch))), device_s=t3 - t2,
                            host_s=(t1 - t0) + (t4 - t3), wait_s=t2 - t1, device_rows=self.device_rows)
        return out

    def prepare(self, batch: dict):
        raise NotImplementedError

    def compute(self, work):
        raise NotImplementedError

    def emit(self, batch: dict, work, result) -> dict:
        raise NotImplementedError

    # ---- helpers ------------------------------------------------------------------------
    def image_work(self, batch: dict, run_seed: int, den: Denoiser) -> Work:
        """The batch's sample rows as ``Work``: seeds from (run seed, shard/key), pixels stacked on the
        host (padded for a compiled UNet) and pinned when a GPU waits for them, so the copy is asynchronous."""
        idx = self.samples(batch)
        if not len(idx):
            return Work(idx, [], None)
        seeds = [sample_seed(run_seed, f"{batch['shard'][i]}/{batch['key'][i]}") for i in idx]
        stacked, seeds = self.padded(den, np.stack(batch["pixels"][idx]), seeds)
        pixels = torch.from_numpy(stacked)
        if den.device.type == "cuda":
            pixels = pixels.pin_memory()
        return Work(idx, seeds, pixels)

    def padded(self, den: Denoiser, rows: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, list[int]]:
        """``rows`` and their seeds as a batch of fixed shape: for a compiled UNet, padded with copies of
        the last row to the largest batch seen (the first, normally full), so that a short last batch
        does not recompile; unchanged otherwise. Callers drop the padded rows' results."""
        if not den.compiled:
            return rows, seeds
        self._fixed_batch = max(self._fixed_batch, len(rows))
        pad = self._fixed_batch - len(rows)
        if not pad:
            return rows, seeds
        return np.concatenate([rows, np.repeat(rows[-1:], pad, 0)]), seeds + [seeds[-1]] * pad

    def fitting(self, run, n: int) -> list:
        """``run(lo, hi)`` over rows [0, n), in pieces of the largest size that fits on the device.

        The whole batch first; on a CUDA out-of-memory error the piece is halved and run again
        (no row is lost or done twice), and the actor keeps the size for its later batches. So a
        ``runtime.batch_size`` larger than the GPU holds (two models in one actor, a long grid
        with ``output.latents: full``) runs at the largest batch that fits instead of failing;
        one row that does not fit fails with a ``DeviceMemoryError`` naming the fixes. Rows are
        independent (per-sample noise), so outputs do not depend on the split. Returns the pieces'
        results.
        """
        results, lo = [], 0
        while lo < n:
            size = min(self.device_rows or n, n - lo)
            try:
                results.append(run(lo, lo + size))
                lo += size
                continue
            except torch.cuda.OutOfMemoryError as exc:
                if size == 1:
                    raise DeviceMemoryError(
                        f"one sample of {type(self).__name__} does not fit in GPU memory even alone: lower "
                        "image.size, choose runtime.dtype float16 or bfloat16, set output.latents to start or none, "
                        f"or run on a GPU with more memory ({str(exc).splitlines()[0]})") from exc
            # out of the except block, the failed attempt's tensors (held by its traceback) can be freed
            gc.collect()
            torch.cuda.empty_cache()
            self.device_rows = (size + 1) // 2
        return results

    @staticmethod
    def samples(batch: dict) -> np.ndarray:
        """Indices of the rows to work on (the SAMPLE rows)."""
        return rows_of(batch, RowKind.SAMPLE)

    @staticmethod
    def pass_rejects(rows: RowBuffer, batch: dict) -> None:
        for i in rows_of(batch, RowKind.REJECT):
            rows.add(shard=batch["shard"][i], key=batch["key"][i], index=int(batch["index"][i]),
                     kind=RowKind.REJECT, error=str(batch["error"][i]))

    def add_latent_rows(self, rows: RowBuffer, z: Latent | LatentMaps | None, batch: dict, idx: np.ndarray) -> int:
        """One LATENT row per (sample, map), as ``output.latents`` asks; returns rows per sample."""
        lat = z if isinstance(z, LatentMaps) or z is None else LatentMaps.of(z, self.output)
        if lat is None:
            return 0
        k = lat.maps.shape[1]
        n = len(idx) * k
        seeds = np.asarray(lat.seeds or [0] * len(idx), dtype=np.int64)
        rows.extend({"shard": np.repeat(batch["shard"][idx], k), "key": np.repeat(batch["key"][idx], k),
                     "index": np.repeat(batch["index"][idx], k), "step": np.tile(np.arange(k), len(idx)),
                     "latent": list(lat.maps.reshape(n, *lat.maps.shape[2:])), "seed": np.repeat(seeds, k)},
                    kind=RowKind.LATENT, timesteps=lat.timesteps)
        return k
