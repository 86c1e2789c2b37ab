"""runtime.pool: where a model stage runs (pipeline/runtime/ray_env.py uses_tasks), and the stage a Ray
task worker keeps between batches and runs (pipeline/stages/base.py stage_in_process)."""

from __future__ import annotations

import pytest

from pipeline.config import RuntimeConfig
from pipeline.runtime import ray_env
from pipeline.stages import base


class Counting:
    built = 0

    def __init__(self, scale):
        type(self).built += 1
        self.scale = scale

    def __call__(self, batch):
        return {"x": [v * self.scale for v in batch["x"]]}


@pytest.fixture(autouse=True)
def _no_kept_stage():
    base._STAGES.clear()
    Counting.built = 0
    yield
    base._STAGES.clear()


def test_a_worker_builds_its_stage_once_per_run_and_keeps_one():
    assert base.stage_in_process({"x": [1, 2]}, Counting, {"scale": 2}, "run-a") == {"x": [2, 4]}
    assert base.stage_in_process({"x": [5]}, Counting, {"scale": 2}, "run-a") == {"x": [10]}
    assert Counting.built == 1  # the run's second batch found its stage built
    # a later run with the very same sections builds it again (a file it names may have changed)
    assert base.stage_in_process({"x": [1]}, Counting, {"scale": 2}, "run-b") == {"x": [2]}
    assert Counting.built == 2 and list(base._STAGES) == ["run-b"]  # one kept: the later run's replaced it


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


@pytest.mark.parametrize(("pool", "gpus", "nodes", "tasks"), [
    ("tasks", 1.0, 3, True), ("actors", 0.0, 1, False),  # said: as said
    ("auto", 0.0, 1, True),  # a laptop, CI, the demo
    ("auto", 1.0, 1, False),  # a GPU: the actor pool bounds the device's model copies
    ("auto", 0.0, 2, False),  # a cluster
])
def test_auto_is_tasks_on_one_node_without_gpus(monkeypatch, pool, gpus, nodes, tasks):
    import ray

    alive = [{"Alive": True}] * nodes + [{"Alive": False}]  # a dead node does not count
    monkeypatch.setattr(ray, "nodes", lambda: alive)
    assert ray_env.uses_tasks(RuntimeConfig(pool=pool), gpus) is tasks
