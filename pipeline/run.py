"""Run a job as a Ray Data pipeline: list shards → read → decode → model → write → commit.

The driver sees only small manifest rows; it commits a shard (merge parts, then the ledger
record) as soon as every row of it is staged, so a long run keeps its finished shards if it
is killed, and a re-run does no work for them.
"""

from __future__ import annotations

import logging
import os
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version

from pipeline.config import JobConfig
from pipeline.data.outputs import OutputStore, merge_parts
from pipeline.data.shards import ShardRef, list_shards
from pipeline.errors import ConfigError, LatentshiftError, StorageError

log = logging.getLogger(__name__)

JOBS = {
    "translate": ("input.uri", "output.uri", "source.model", "target.model"),
    "encode": ("input.uri", "output.uri", "source.model"),
    "decode": ("input.uri", "output.uri", "target.model"),
}


@dataclass
class ShardProgress:
    ref: ShardRef
    parts: list[str] = field(default_factory=list)
    samples: int = 0
    latent_rows: int = 0
    latent_rows_expected: int = 0
    expected_rows: int | None = None
    committed: bool = False


def list_latent_files(uri: str, storage_options: dict) -> list[ShardRef]:
    """Latent Parquet files of an encode run (its output.uri, or its latents/ folder)."""
    from pipeline.data.latents import latent_files

    fs, files = latent_files(uri, storage_options)
    proto = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""
    return [ShardRef(proto + p, posixpath.basename(p)[: -len(".parquet")]) for p in files]


def versions() -> dict:
    out = {}
    for pkg in ("latentshift", "torch", "diffusers", "ray"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "unknown"
    return out


def commit_shard(store: OutputStore, run_id: str, ref: ShardRef, parts: list[str], job: str,
                 config_hash: str, expected_rows: int) -> dict:
    """Merge one shard's parts into its outputs, then write its ledger record (the commit point)."""
    counts = merge_parts(store, run_id, ref.name, parts)
    record = {"shard": ref.name, "input": ref.uri, "job": job, "run_id": run_id, "rows_in": expected_rows,
              **counts, "config_hash": config_hash, "versions": versions(), "committed_at": time.time()}
    store.put_json(store.ledger(ref.name), record)
    store.remove_tree(store.staging(run_id, ref.name))
    return record


def preflight(cfg: JobConfig, job: str) -> tuple[list[ShardRef], OutputStore]:
    """Everything that can fail without a model: config keys, input listing, output writability."""
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
    cfg.require(*JOBS[job])
    if job == "decode":
        shards = list_latent_files(cfg.input.uri, cfg.input.storage_options)
        if not shards:
            raise StorageError(f"{cfg.input.uri}: no latent .parquet files (give the output.uri of an encode run, or its latents/ folder)")
    else:
        shards = list_shards(cfg.input.uri, cfg.input.storage_options)
        if not shards:
            raise StorageError(f"{cfg.input.uri}: no .tar shards found; check input.uri (pack images with `latentshift shards pack`)")
    return shards, open_output(cfg)


def open_output(cfg: JobConfig) -> OutputStore:
    """The output store, after a probe write: a bad bucket or credentials fail here, before any model."""
    store = OutputStore(cfg.output.uri, cfg.output.storage_options)
    try:
        store.probe_writable()
    except LatentshiftError:
        raise
    except Exception as exc:  # noqa: BLE001
        from pipeline.data.filesystems import explain_storage_error

        raise explain_storage_error(cfg.output.uri, exc) from None
    return store


def _gpus_per_actor(cfg: JobConfig) -> float:
    """``auto``: $LATENTSHIFT_GPUS_PER_ACTOR if set, else 1 if the cluster has GPUs now, else 0.

    A cluster whose GPU workers scale from zero shows no GPU when the job starts, so its head
    sets the variable (k8s/base does) and the actors' GPU requests make the autoscaler add them.
    """
    import ray

    if cfg.runtime.gpus_per_actor != "auto":
        return float(cfg.runtime.gpus_per_actor)
    declared = os.environ.get("LATENTSHIFT_GPUS_PER_ACTOR", "").strip()
    if declared:
        try:
            return max(0.0, float(declared))
        except ValueError:
            raise ConfigError(f"LATENTSHIFT_GPUS_PER_ACTOR = {declared!r}: expected a number such as 1 or 0.5") from None
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, log_to_driver=True, include_dashboard=False if not address else None,
                 configure_logging=False)


def run_job(cfg: JobConfig, job: str, overwrite: bool = False, out=sys.stdout) -> dict:
    """Run ``job`` (translate | encode | decode) over every uncommitted shard; return the summary."""
    started = time.time()
    shards, store = preflight(cfg, job)
    done = set() if overwrite else store.committed()
    todo = [s for s in shards if s.name not in done]
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    summary = {"run_id": run_id, "job": job, "shards_total": len(shards), "shards_skipped": len(shards) - len(todo),
               "shards_done": 0, "images": 0, "rejected": 0, "latent_samples": 0, "config_hash": cfg.config_hash()}
    if todo:
        store.remove_tree(store.path("_staging"))  # a killed run's parts: its shards are redone here
        _run_pipeline(cfg, job, todo, store, run_id, summary)
    elapsed = time.time() - started
    summary["seconds"] = round(elapsed, 3)
    summary["images_per_second"] = round(summary["images"] / elapsed, 3) if elapsed > 0 else 0.0
    store.put_json(store.path("_ledger", "runs", f"{run_id}.json"), summary)
    print_summary(summary, out)
    return summary


def read_images(cfg: JobConfig, todo: list[ShardRef], store: OutputStore, run_id: str):
    """Stages 1–2: one read task per shard (rows per sample, rejects included), then decode."""
    import ray.data

    from pipeline.stages.decode import decode_images
    from pipeline.stages.read import read_shard

    io_args = {"storage_options": cfg.input.storage_options, "store": store, "run_id": run_id}
    ds = ray.data.from_items([{"uri": s.uri, "name": s.name} for s in todo], override_num_blocks=len(todo))
    ds = ds.flat_map(read_shard, fn_kwargs=io_args)
    return ds.map_batches(decode_images, batch_format="numpy", batch_size=cfg.runtime.batch_size,
                          fn_kwargs={"size": cfg.image.size, "resize": cfg.image.resize,
                                     "max_pixels": cfg.image.max_pixels})


def model_stage(ds, cfg: JobConfig, stage_cls, **kwargs):
    """Stage 3: an actor pool, models loaded once per actor, fixed-size tensor batches."""
    import ray.data

    actors = cfg.runtime.actors
    pool = (ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]) if isinstance(actors, list)
            else ray.data.ActorPoolStrategy(size=actors))
    gpus = _gpus_per_actor(cfg)
    return ds.map_batches(stage_cls, batch_format="numpy", batch_size=cfg.runtime.batch_size, compute=pool,
                          num_gpus=gpus, num_cpus=0 if gpus else 1,
                          fn_constructor_kwargs={"config": cfg.to_dict(), "config_hash": cfg.config_hash(), **kwargs})


def _run_pipeline(cfg: JobConfig, job: str, todo: list[ShardRef], store: OutputStore, run_id: str, summary: dict):
    import ray.data

    from pipeline.stages.model import DecodeStage, EncodeStage, TranslateStage
    from pipeline.stages.read import read_latent_file

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = True
    if job == "decode":
        io_args = {"storage_options": cfg.input.storage_options, "store": store, "run_id": run_id}
        ds = ray.data.from_items([{"uri": s.uri, "name": s.name} for s in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(read_latent_file, fn_kwargs=io_args)
    else:
        ds = read_images(cfg, todo, store, run_id)
    stage = {"translate": TranslateStage, "encode": EncodeStage, "decode": DecodeStage}[job]
    ds = model_stage(ds, cfg, stage)
    write_and_commit(ds, cfg, job, todo, store, run_id, summary)


def write_and_commit(ds, cfg: JobConfig, job: str, todo: list[ShardRef], store: OutputStore, run_id: str,
                     summary: dict, on_forward=None) -> None:
    """Stages 4–5: stage parts per shard (CPU tasks), commit each shard once all its rows are staged.

    ``on_forward(payload)`` receives the rows a stage forwards to the driver (e.g. partial fits).
    """
    import ray

    from pipeline.stages.read import EXPECTED
    from pipeline.stages.write import write_parts

    ds = ds.map_batches(write_parts, batch_format="numpy", batch_size=None,
                        fn_kwargs={"store": store, "run_id": run_id, "image_format": cfg.output.image_format})
    progress = {s.name: ShardProgress(s) for s in todo}
    remote_commit = ray.remote(num_cpus=0.25, max_retries=3)(commit_shard)
    pending = []
    psnr_sum = ssim_sum = metric_count = 0.0

    def try_commit(p: ShardProgress) -> None:
        if p.committed:
            return
        if p.expected_rows is None:
            path = posixpath.join(store.staging(run_id, p.ref.name), EXPECTED)
            if not store.exists(path):
                return
            p.expected_rows = int(store.get_json(path)["rows"])
        if p.samples >= p.expected_rows and p.latent_rows >= p.latent_rows_expected:
            p.committed = True
            pending.append(remote_commit.remote(store, run_id, p.ref, p.parts, job, cfg.config_hash(), p.expected_rows))

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        touched = set()
        for i in range(len(batch["part"])):
            if not batch["part"][i]:
                if on_forward is not None:
                    on_forward(batch["forward"][i])
                continue
            p = progress[str(batch["shard"][i])]
            p.parts.append(str(batch["part"][i]))
            p.samples += int(batch["samples"][i])
            p.latent_rows += int(batch["latent_rows"][i])
            p.latent_rows_expected += int(batch["latent_rows_expected"][i])
            psnr_sum += float(batch["psnr_sum"][i])
            ssim_sum += float(batch["ssim_sum"][i])
            metric_count += float(batch["metric_count"][i])
            touched.add(p.ref.name)
        for name in touched:
            try_commit(progress[name])
    for p in progress.values():  # shards whose last rows came before their reader finished, or empty shards
        try_commit(p)
    incomplete = [p.ref.name for p in progress.values() if not p.committed]
    records = ray.get(pending)
    if not incomplete:
        store.remove_tree(store.staging(run_id))
    for r in records:
        summary["shards_done"] += 1
        summary["images"] += r["images"]
        summary["rejected"] += r["rejected"]
        summary["latent_samples"] += r.get("latent_samples", 0)
        summary.setdefault("bytes_latents", 0)
        summary["bytes_latents"] += r.get("bytes_latents", 0)
    if summary.get("latent_samples"):
        summary["latent_bytes_per_image"] = round(summary["bytes_latents"] / summary["latent_samples"])
    if metric_count:
        summary["mean_psnr"] = round(psnr_sum / metric_count, 3)
        summary["mean_ssim"] = round(ssim_sum / metric_count, 4)
    if incomplete:
        summary["incomplete_shards"] = incomplete
        log.error("shards not committed (rows missing): %s", ", ".join(incomplete))


def print_summary(s: dict, out=sys.stdout) -> None:
    lines = [
        f"latentshift {s['job']}  run {s['run_id']}",
        f"  shards     {s['shards_done']} done, {s['shards_skipped']} skipped (already committed), {s['shards_total']} total",
        f"  images     {s['images']} written, {s['rejected']} rejected (see _rejects/)",
    ]
    if s.get("latent_samples"):
        lines.append(f"  latents    {s['latent_samples']} samples, {s.get('latent_bytes_per_image', 0)} bytes per image")
    lines.append(f"  speed      {s['images_per_second']} images/s over {s['seconds']} s")
    if "mean_psnr" in s:
        lines.append(f"  quality    mean PSNR {s['mean_psnr']} dB, mean SSIM {s['mean_ssim']} (output vs input)")
    if s.get("incomplete_shards"):
        lines.append(f"  INCOMPLETE {', '.join(s['incomplete_shards'])}: re-run to finish them")
    out.write("\n".join(lines) + "\n")
    out.flush()
