"""runtime.pool tasks on a real local Ray: a run's stage is not reused by a later run
(pipeline/stages/base.py stage_in_process)."""

from __future__ import annotations

from pipeline.runtime import ray_env


def test_a_run_after_a_refit_reads_the_new_file(ray_cluster, tmp_path):
    """Two runs of one config in one driver whose stage reads a file in __init__, the file written again
    between them (as `ood fit` writes the stats `ood sample` reads): the second run sees the new file."""
    import ray.data

    from pipeline.config import RuntimeConfig as Runtime

    class ReadsAFile:  # defined here: Ray pickles it by value
        def __init__(self, path, dtype=None, compile=None):
            self.value = int(open(path).read())

        def __call__(self, batch):
            return {"id": batch["id"], "value": [self.value] * len(batch["id"])}

    path = tmp_path / "stats.txt"
    seen = []
    for value in (1, 2):
        path.write_text(str(value))
        ds = ray_env.model_stage(ray.data.range(4), Runtime(pool="tasks", batch_size=2), ReadsAFile, path=str(path))
        seen.append(sorted({int(v) for v in ds.to_pandas()["value"]}))
    assert seen == [[1], [2]]
