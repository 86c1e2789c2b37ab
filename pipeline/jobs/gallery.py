"""gallery: a browsable static gallery of an output, ``<output.uri>/gallery/index.html`` (docs/gallery.md).

  units    the output's committed shards (a ``_ledger/<shard>.json`` record; a shard whose every sample
           was rejected too: its page lists the rejects)
  build    one CPU task per shard (pipeline/stages/gallery.py): its thumbnails and pages under
           ``gallery/<shard>/`` (in input order and in the order of each of its scores), committed by the ledger's rules under ``<output>/_gallery/``: a re-run
           skips the shards it showed
  prepare  a shard shown before its images (translate --overwrite) or its scores (a later `latentshift
           score`) were committed again, or with another ``gallery`` section, is shown again
  finish   ``gallery/index.html``: every committed shard, with the run's settings (a page of 200 shards:
           index-2.html … the next)

With ``output.gallery: true`` translate, edit, search, guide and ood sample run this job over their output
at the end of each run, once their run record is written (``AFTER_RUN``): a run of its own, which shows
the shards committed since.
"""

from __future__ import annotations

import posixpath

from pipeline.errors import StorageError
from pipeline.runtime.job import Built, Job, SubRun, provenance

CONTROL = "_gallery"


def _output(cfg):
    from pipeline.data.outputs import OutputStore

    return OutputStore(cfg.output.uri, cfg.output.storage_options)


def _committed(cfg) -> list[str]:
    """The output's committed shards (the ledger of the job that wrote its images), in name order."""
    from pipeline.data.filesystems import explain_storage_error

    try:
        return sorted(_output(cfg).committed())
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad bucket or credentials: one clear line
        raise explain_storage_error(cfg.output.uri, exc) from None


def units(cfg):
    from pipeline.data.shards import ShardRef

    names = _committed(cfg)
    if not names:
        raise StorageError(f"{cfg.output.uri}: no committed shards (_ledger/<shard>.json); run translate (or "
                           "another job that writes images) first")
    return [ShardRef(posixpath.join(cfg.output.uri.rstrip("/"), "images", f"{name}.tar"), name) for name in names]


def prepare(run) -> None:
    """The input shards by name (a bad input.uri fails here, before any work), and the shards to show again."""
    from pipeline.runtime.job import image_shards

    cfg = run.cfg
    run.state["inputs"] = ({s.name: s.uri for s in image_shards(cfg.input.uri, cfg.input.storage_options)}
                           if cfg.input.uri else None)
    run.state["redone"] = forget_stale(run)


def forget_stale(run) -> list[str]:
    """Shards whose gallery is older than what it shows: their images or scores committed again since
    (``committed_at`` of the job's and the score job's ledger records), or shown with another ``gallery``
    section. Their gallery records are removed, so this run shows them again. Returns their names."""
    from pipeline.data.gallery import summary_path
    from pipeline.data.outputs import OutputStore
    from pipeline.jobs.score import CONTROL as SCORE_CONTROL
    from pipeline.stages.gallery import layout

    if run.options.get("overwrite"):
        return []
    output = _output(run.cfg)
    scores = OutputStore(run.cfg.output.uri, run.cfg.output.storage_options, SCORE_CONTROL)
    stale = []
    for name in sorted(run.store.committed()):
        try:
            shown = run.store.get_json(run.store.ledger(name)).get("committed_at", 0)
            summary = run.store.get_json(summary_path(run.store, name))
            made = output.get_json(output.ledger(name)).get("committed_at", 0)
            scored = (scores.get_json(scores.ledger(name)).get("committed_at", 0)
                      if scores.exists(scores.ledger(name)) else 0)
        except Exception:  # noqa: BLE001 - a record gone meanwhile: show the shard again
            made, scored, shown, summary = 1, 1, 0, {}
        if max(made, scored) > shown or summary.get("layout") != layout(run.cfg.gallery):
            run.store.remove(run.store.ledger(name))
            stale.append(name)
    return stale


def build(run, shards):
    import ray.data

    from pipeline.jobs.score import CONTROL as SCORE_CONTROL
    from pipeline.stages.gallery import gallery_shards

    cfg = run.cfg
    ds = ray.data.from_items([{"uri": s.uri, "name": s.name} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(gallery_shards, batch_format="numpy", batch_size=1,
                        fn_kwargs={"output_uri": cfg.output.uri, "output_options": cfg.output.storage_options,
                                   "inputs": run.state["inputs"], "input_options": cfg.input.storage_options,
                                   "reject_folders": {"job": "", "score": SCORE_CONTROL}, "gallery": cfg.gallery,
                                   "max_pixels": cfg.image.max_pixels, "ledger": run.ledger})
    return Built(ds, provenance(run, {"gallery": cfg.gallery.model_dump(mode="json")}))


def finish(run) -> None:
    """``gallery/index.html`` (index-2.html … : ``INDEX_ROWS`` shards a page): every committed shard of the
    output, those not shown yet marked so."""
    from pipeline.data.gallery import summary_path, write_index

    cfg, store = run.cfg, run.store
    shown = store.committed()
    shards = []
    for name in _committed(cfg):
        summary = None
        if name in shown:
            try:
                summary = store.get_json(summary_path(store, name))
            except Exception:  # noqa: BLE001 - removed meanwhile: listed as not shown
                summary = None
        shards.append(summary or {"shard": name, "missing": True})
    path = write_index(_output(cfg), cfg.output.uri, shards, latest_run(cfg))
    # its "images": the samples this run put on pages (the common summary's line and speed count them)
    run.summary["images"] = sum(s.get("samples", 0) for s in shards if s.get("run_id") == run.run_id)
    run.summary.update(gallery=path, gallery_shards=sum(1 for s in shards if not s.get("missing")),
                       gallery_samples=sum(s.get("samples", 0) for s in shards), redone=run.state.get("redone", []))


def latest_run(cfg) -> dict | None:
    """The output's latest run record (``_ledger/runs/<run id>.json``: run ids begin with their time)."""
    store = _output(cfg)
    records = sorted(p for p in store.listdir(store.ctl("_ledger", "runs")) if p.endswith(".json"))
    if not records:
        return None
    try:
        return store.get_json(records[-1])
    except Exception:  # noqa: BLE001 - unreadable: the index goes without it
        return None


def summary_lines(s: dict) -> list[str]:
    if "gallery" not in s:
        return []
    lines = [f"  gallery    {s['gallery_shards']} shard(s), {s['gallery_samples']} sample(s): {s['gallery']}"]
    if s.get("redone"):
        lines.append(f"  shown again {len(s['redone'])} shard(s) whose images or scores were committed again since")
    return lines


JOB = Job(
    name="gallery",
    command=("gallery",),
    help="a browsable static gallery of output.uri (gallery.*): gallery/index.html, pages of thumbnails per shard",
    requires=("output.uri",),
    units=units,
    build=build,
    commits=(),  # its pages are written in place by its tasks; its ledger only records the shards shown
    summary=summary_lines,
    prepare=prepare,
    finish=finish,
    control=CONTROL,
)


def after_run_config(parent, cfg):
    """``output.gallery``: the gallery of the parent's output, once the parent has committed a shard."""
    if not cfg.output.gallery or not _committed(cfg):
        return None
    return cfg


# translate, edit, search, guide, ood sample: the gallery once their run is recorded, when output.gallery is set
AFTER_RUN = SubRun("", after_run_config, hand_over=lambda parent, run: None, job=JOB, after="record", redo=False)
