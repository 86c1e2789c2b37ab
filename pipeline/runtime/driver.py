"""The driver's loop: stage every row through the writer, commit each shard when it is complete.

The driver sees only the writer's manifest rows (one small row per staged part) and the
PARTIAL rows a job forwards; the ledger (``pipeline.data.ledger``) decides when a shard is
complete and commits it in a Ray task, so a long run keeps its finished shards if killed.
"""

from __future__ import annotations

import logging
from importlib.metadata import version

from pipeline.data.ledger import CommitTracker
from pipeline.data.rows import RowKind
from pipeline.data.run_metrics import RunMetrics
from pipeline.data.shards import ShardRef

log = logging.getLogger(__name__)


def versions() -> dict:
    out = {}
    for pkg in ("latentshift", "torch", "diffusers", "ray"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "unknown"
    return out


def write_and_commit(run, built, shards: list[ShardRef]) -> dict:
    """Write ``built.dataset`` (CPU write tasks), commit each shard once all its rows are staged.

    Returns the totals: shards_done, images, rejected (samples), dropped (members), latent_samples, bytes_latents, the
    quality and score sums (``metrics``: ``RunMetrics``), the shards left incomplete (rows missing), and those another
    run did ({shard: its run}).
    """
    import ray

    from pipeline.runtime.progress import Progress
    from pipeline.stages.write import write_parts

    ledger, cfg = run.ledger, run.cfg
    manifests = built.dataset.map_batches(
        write_parts, batch_format="numpy", batch_size=None,
        fn_kwargs={"ledger": ledger, "image_format": cfg.output.image_format, "provenance": built.provenance})
    tracker = CommitTracker(ledger, [s.name for s in shards])
    uri = {s.name: s.uri for s in shards}
    commit = ray.remote(num_cpus=0.25, max_retries=3)(type(ledger).commit)
    pending = []
    metrics = RunMetrics()
    job, config_hash, pkg_versions = run.job.name, cfg.config_hash(), versions()
    progress = Progress(job, len(shards), run.out)

    def commit_if_complete(shard: str) -> None:
        if tracker.complete(shard):
            p = tracker.take(shard)
            progress.add(shards=1)
            pending.append(commit.remote(ledger, shard, uri[shard], p.parts, job, config_hash, p.expected_rows,
                                         pkg_versions, run.job.commits))

    for batch in manifests.iter_batches(batch_size=None, batch_format="numpy"):
        touched = set()
        for i in range(len(batch["kind"])):
            if batch["kind"][i] == RowKind.PARTIAL:
                if built.on_partial is not None:
                    built.on_partial(bytes(batch["partial"][i]))
                continue
            shard = str(batch["shard"][i])
            tracker.add(shard, str(batch["part"][i]), int(batch["rows"][i]), int(batch["latent_rows"][i]),
                        int(batch["latent_rows_expected"][i]))
            metrics.merge(RunMetrics.from_columns(batch, i))
            rejected = int(batch["rejected"][i])
            progress.add(samples=int(batch["rows"][i]) - rejected, rejected=rejected)
            touched.add(shard)
        for shard in touched:
            commit_if_complete(shard)
    for s in shards:  # shards whose last rows came before their reader finished, or empty shards
        commit_if_complete(s.name)
    records = ray.get(pending)
    lost = {r["shard"] for r in records if r.get("lost")}  # taken over by another run (our lease ran out)
    records = [r for r in records if not r.get("lost")]
    # a shard whose reader found it claimed (or committed) by another run is that run's, not missing
    elsewhere = {s: ledger.taken_by(s) for s in lost}
    elsewhere.update({s: run_id for s in tracker.incomplete() if (run_id := ledger.taken_by(s))})
    incomplete = [s for s in tracker.incomplete() if s not in elsewhere]
    if incomplete:
        log.error("shards not committed (rows missing): %s", ", ".join(incomplete))
    return {"shards_done": len(records), "images": sum(r["images"] for r in records),
            "rejected": sum(r["rejected"] for r in records), "dropped": sum(r.get("dropped", 0) for r in records),
            "latent_samples": sum(r.get("latent_samples", 0) for r in records),
            "bytes_latents": sum(r.get("bytes_latents", 0) for r in records), "metrics": metrics,
            "incomplete": incomplete, "elsewhere": elsewhere}
