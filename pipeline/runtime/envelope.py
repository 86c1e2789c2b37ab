"""The run envelope: the one way any job runs.

  preflight    config keys the job needs, its own checks, the input listing, an output
               probe write: everything that can fail without a model, before Ray starts
  run id       one per run: staging folder, run record, ledger records
  prepare      the job may end the run here (e.g. an OOD fit that is up to date)
  skip         shards with a ledger record are done (unless --overwrite, or the job redoes all)
  lease        with work to do, the run's lease is held (renewed) until its end (data/claims.py)
  claims       shards another live run is doing are left to it (none left: one line, exit 0);
               a job that claims up front takes its shards here, the others claim as they read
  models       every model the job loads is resolved and checked (``Job.models``, runtime/models.py),
               before any staging and before Ray; a model that still fails on an actor ends the
               run once, in one line
  clear        the staging of runs that are no longer alive: their uncommitted shards are redone
  run          the job builds its dataset; the driver writes and commits shard by shard
  end          whatever happened: claims still held are given up, this run's staging removed
  sub-runs     the runs of their own the job declares (``Job.subruns``), each through this same
               envelope under a folder of the output, its finished ``Run`` handed to the job in
               memory: those ``after="commits"`` here, those ``after="finish"`` after the finish
  finish       the job's own outputs (e.g. the stats file)
  summary      printed, and kept as the run record ``_ledger/runs/<run id>.json``
  after        sub-runs ``after="record"``: runs of their own over the output once this one is
               recorded (``output.gallery``: the gallery job, whose index shows this run's record)
"""

from __future__ import annotations

import posixpath
import sys
import time
import uuid

from pipeline.config import JobConfig
from pipeline.data.claims import keep_alive
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.data.shards import ShardRef
from pipeline.errors import LatentshiftError, StorageError
from pipeline.runtime.job import Job, Run, SubRun
from pipeline.runtime.models import actor_failure, check_models


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def open_output(uri: str, storage_options: dict, control: str = "") -> OutputStore:
    """The output store, after a probe write: a bad bucket or credentials fail here, before any model."""
    store = OutputStore(uri, storage_options, control)
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
    return _run(job, cfg, overwrite, out, options).summary


def _run(job: Job, cfg: JobConfig, overwrite: bool, out, options: dict) -> Run:
    """The envelope, step by step (see the module's docstring); returns the run, its summary filled."""
    from pipeline.runtime.driver import write_and_commit
    from pipeline.runtime.ray_env import init_ray

    started = time.time()
    cfg.require(*job.requires)
    if job.check is not None:
        job.check(cfg)
    shards = job.units(cfg)
    store = open_output(cfg.output.uri, cfg.output.storage_options, job.control)
    ledger = ShardLedger(store, new_run_id(), redo_committed=overwrite or not job.skip_committed,
                         lease_seconds=cfg.output.lease_seconds)
    run = Run(job, cfg, store, ledger, options={"overwrite": overwrite, **options}, out=out)
    if job.prepare is not None:
        early = job.prepare(run)
        if early is not None:
            run.summary = early
            return run
    done = set() if overwrite or not job.skip_committed else run.ledger.committed()
    todo = [s for s in shards if s.name not in done]
    s = run.summary
    s.update(run_id=run.run_id, job=job.name, shards_total=len(shards), shards_skipped=len(shards) - len(todo),
             shards_done=0, shards_elsewhere=0, images=0, rejected=0, dropped=0, latent_samples=0,
             config_hash=cfg.config_hash(),
             outputs=list(job.commits))  # what the run record says this job writes under output.uri
    if todo:
        with keep_alive(run.ledger.claims):
            try:
                mine = _take_shards(run, todo)
                if not mine:
                    out.write(_elsewhere_line(run) + "\n")
                    out.flush()
                    return run
                check_models(job, cfg)  # only when there is model work: a run with nothing to do loads none
                run.ledger.clear_dead_staging()
                init_ray()
                built = job.build(run, mine)
                _add_totals(s, write_and_commit(run, built, mine))
            except Exception as exc:
                failure = actor_failure(exc, job, cfg)
                if failure is None:
                    raise
                raise failure from exc  # the CLI prints the one line; --verbose, the chain from the actor
            finally:
                run.ledger.finish([t.name for t in todo])
    _sub_runs(run, "commits")
    if job.finish is not None:
        job.finish(run)
    _sub_runs(run, "finish")
    elapsed = time.time() - started
    s["seconds"] = round(elapsed, 3)
    s["images_per_second"] = round(s["images"] / elapsed, 3) if elapsed > 0 else 0.0
    run.ledger.record_run(s)
    out.write("\n".join(summary_lines(s) + job.summary(s)) + "\n")
    out.flush()
    run.finished = True
    _sub_runs(run, "record")
    return run


def _sub_runs(parent: Run, after: str) -> None:
    for sub in parent.job.subruns:
        if sub.after == after:
            _sub_run(parent, sub)


def _sub_run(parent: Run, sub: SubRun) -> None:
    """One declared sub-run: its config derived from the parent's, run through the envelope under
    ``sub.folder`` (its own ledger, claims, rejects, run record and summary lines) redoing every
    shard, then handed to the parent in memory. With ``redo=False``: a run of its job like any other
    (committed shards skipped, shards another run does left to it), nothing handed over."""
    cfg = parent.cfg.model_copy(deep=True)
    if sub.folder:
        cfg.output.uri = posixpath.join(parent.cfg.output.uri.rstrip("/"), sub.folder)
    cfg = sub.config(parent, cfg)
    if cfg is None:
        return
    run = _run(sub.job or parent.job, cfg, overwrite=sub.redo, out=parent.out, options={})
    if not sub.redo:  # its shards are done, by it or by the run its line named
        return
    if not run.finished:  # another run walks the same input into the same folder now (its line said so)
        raise StorageError(f"{cfg.output.uri}: another run of {parent.job.name} is doing this part now; "
                           f"run `latentshift {' '.join(parent.job.command)}` again once it has ended")
    sub.hand_over(parent, run)


def _take_shards(run: Run, todo: list[ShardRef]) -> list[ShardRef]:
    """The shards this run will do: those no other live run holds. A job that claims up front
    takes them now; one that covers all its input (``skip_committed=False``) takes all or none."""
    elsewhere = run.ledger.claims.held_elsewhere([t.name for t in todo])
    mine = [t for t in todo if t.name not in elsewhere]
    if run.job.claim_up_front or not run.job.skip_committed:
        taken = [t for t in mine if run.ledger.begin(t.name)]
        if not run.job.skip_committed and len(taken) < len(todo):
            for t in taken:
                run.ledger.claims.release(t.name)
            taken = []
            elsewhere.update({t.name: run.ledger.claims.holder(t.name) for t in todo if t.name not in elsewhere})
        else:
            elsewhere.update({t.name: run.ledger.claims.holder(t.name) for t in mine if t not in taken})
        mine = taken
    _note_elsewhere(run.summary, elsewhere)
    return mine


def _note_elsewhere(s: dict, elsewhere: dict[str, str | None]) -> None:
    """Shards another run did or does now: counted, with the runs named, never as incomplete."""
    s["shards_elsewhere"] = s.get("shards_elsewhere", 0) + len(elsewhere)
    s["elsewhere_runs"] = sorted(set(s.get("elsewhere_runs", [])) | {r for r in elsewhere.values() if r})


def _elsewhere_line(run: Run) -> str:
    s = run.summary
    return (f"latentshift {run.job.name}: nothing to do here: the {s['shards_elsewhere']} shard(s) left are being done "
            f"by run {', '.join(s['elsewhere_runs']) or '?'} on the same output ({run.store.uri}); that run "
            f"commits them")


def _add_totals(s: dict, t: dict) -> None:
    for k in ("shards_done", "images", "rejected", "dropped", "latent_samples"):
        s[k] += t[k]
    s["bytes_latents"] = t["bytes_latents"]
    if s["latent_samples"]:
        s["latent_bytes_per_image"] = round(t["bytes_latents"] / s["latent_samples"])
    s.update(t["metrics"].summary())  # mean PSNR, SSIM, CLIP score …: only those measured
    if t["incomplete"]:
        s["incomplete_shards"] = t["incomplete"]
    _note_elsewhere(s, t["elsewhere"])


def summary_lines(s: dict) -> list[str]:
    lines = [
        f"latentshift {s['job']}  run {s['run_id']}",
        f"  shards     {s['shards_done']} done, {s['shards_skipped']} skipped (already committed), {s['shards_total']} total",
        f"  images     {s['images']} written, {s['rejected']} rejected, {s['dropped']} members dropped (see _rejects/)",
    ]
    if s.get("latent_samples"):
        lines.append(f"  latents    {s['latent_samples']} samples, {s.get('latent_bytes_per_image', 0)} bytes per image")
    if s.get("shards_elsewhere"):
        lines.append(f"  elsewhere  {s['shards_elsewhere']} shards done by another run at the same time "
                     f"({', '.join(s['elsewhere_runs']) or '?'})")
    lines.append(f"  speed      {s['images_per_second']} images/s over {s['seconds']} s")
    if "mean_psnr" in s:
        lines.append(f"  quality    mean PSNR {s['mean_psnr']} dB, mean SSIM {s['mean_ssim']} (output vs input)")
    if s.get("scored"):
        directional = f", mean directional CLIP {s['mean_directional']}" if "mean_directional" in s else ""
        lines.append(f"  scores     {s['scored']} images: mean CLIP score {s['mean_clip_score']}{directional} (scores/)")
    if s.get("incomplete_shards"):
        lines.append(f"  INCOMPLETE {', '.join(s['incomplete_shards'])}: re-run to finish them")
    return lines
