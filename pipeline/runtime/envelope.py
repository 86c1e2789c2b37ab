"""The run envelope: the one way any job runs.

  preflight    config keys the job needs, its own checks, the input listing, an output
               probe write: everything that can fail without a model, before Ray starts
  run id       one per run: staging folder, run record, ledger records
  prepare      the job may end the run here (e.g. an OOD fit that is up to date)
  skip         shards with a ledger record are done (unless --overwrite, or the job redoes all)
  models       with work to do (runtime/models.py): every model the job loads is resolved and checked (``Job.models``),
               before any staging and before Ray; a model that still fails on an actor ends the
               run once, in one line, its staging removed
  clear        a killed run's staging: its uncommitted shards are redone
  run          the job builds its dataset; the driver writes and commits shard by shard
  finish       the job's own outputs (e.g. the stats file)
  summary      printed, and kept as the run record ``_ledger/runs/<run id>.json``
"""

from __future__ import annotations

import sys
import time
import uuid

from pipeline.config import JobConfig
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.errors import LatentshiftError
from pipeline.runtime.job import Job, Run
from pipeline.runtime.models import check_models, model_load_failure


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def open_output(uri: str, storage_options: dict) -> OutputStore:
    """The output store, after a probe write: a bad bucket or credentials fail here, before any model."""
    store = OutputStore(uri, storage_options)
    try:
        store.probe_writable()
    except LatentshiftError:
        raise
    except Exception as exc:  # noqa: BLE001
        from pipeline.data.filesystems import explain_storage_error

        raise explain_storage_error(uri, exc) from None
    return store


def run_job(job: Job, cfg: JobConfig, overwrite: bool = False, out=sys.stdout, **options) -> dict:
    """Run ``job`` over every shard not yet committed; print and return the summary."""
    from pipeline.runtime.driver import write_and_commit
    from pipeline.runtime.ray_env import init_ray

    started = time.time()
    cfg.require(*job.requires)
    if job.check is not None:
        job.check(cfg)
    shards = job.units(cfg)
    store = open_output(cfg.output.uri, cfg.output.storage_options)
    run = Run(job, cfg, store, ShardLedger(store, new_run_id()), options={"overwrite": overwrite, **options}, out=out)
    if job.prepare is not None:
        early = job.prepare(run)
        if early is not None:
            return early
    done = set() if overwrite or not job.skip_committed else run.ledger.committed()
    todo = [s for s in shards if s.name not in done]
    s = run.summary
    s.update(run_id=run.run_id, job=job.name, shards_total=len(shards), shards_skipped=len(shards) - len(todo),
             shards_done=0, images=0, rejected=0, dropped=0, latent_samples=0, config_hash=cfg.config_hash(),
             outputs=list(job.commits))  # what the run record says this job writes under output.uri
    if todo:
        check_models(job, cfg)  # only when there is model work: a run with nothing to do loads none
        run.ledger.clear_staging()
        init_ray()
        try:
            built = job.build(run, todo)
            totals = write_and_commit(run, built, todo)
        except Exception as exc:
            failure = model_load_failure(exc, job, cfg)
            if failure is None:
                raise
            run.ledger.finish()  # nothing of this run can commit: its staging goes
            raise failure from None
        _add_totals(s, totals)
    if job.finish is not None:
        job.finish(run)
    elapsed = time.time() - started
    s["seconds"] = round(elapsed, 3)
    s["images_per_second"] = round(s["images"] / elapsed, 3) if elapsed > 0 else 0.0
    run.ledger.record_run(s)
    out.write("\n".join(summary_lines(s) + job.summary(s)) + "\n")
    out.flush()
    return s


def _add_totals(s: dict, t: dict) -> None:
    for k in ("shards_done", "images", "rejected", "dropped", "latent_samples"):
        s[k] += t[k]
    s["bytes_latents"] = t["bytes_latents"]
    if s["latent_samples"]:
        s["latent_bytes_per_image"] = round(t["bytes_latents"] / s["latent_samples"])
    if t["metric_count"]:
        s["mean_psnr"] = round(t["psnr_sum"] / t["metric_count"], 3)
        s["mean_ssim"] = round(t["ssim_sum"] / t["metric_count"], 4)
    if t["incomplete"]:
        s["incomplete_shards"] = t["incomplete"]


def summary_lines(s: dict) -> list[str]:
    lines = [
        f"latentshift {s['job']}  run {s['run_id']}",
        f"  shards     {s['shards_done']} done, {s['shards_skipped']} skipped (already committed), {s['shards_total']} total",
        f"  images     {s['images']} written, {s['rejected']} rejected, {s['dropped']} members dropped (see _rejects/)",
    ]
    if s.get("latent_samples"):
        lines.append(f"  latents    {s['latent_samples']} samples, {s.get('latent_bytes_per_image', 0)} bytes per image")
    lines.append(f"  speed      {s['images_per_second']} images/s over {s['seconds']} s")
    if "mean_psnr" in s:
        lines.append(f"  quality    mean PSNR {s['mean_psnr']} dB, mean SSIM {s['mean_ssim']} (output vs input)")
    if s.get("incomplete_shards"):
        lines.append(f"  INCOMPLETE {', '.join(s['incomplete_shards'])}: re-run to finish them")
    return lines
