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
