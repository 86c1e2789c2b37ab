"""Sub-runs (``Job.subruns``, run by ``runtime.envelope``): declared, run through the envelope
under their folder with a ledger of their own, their result handed to the parent in memory; on
a local output store, with a stand-in for Ray and the driver (the real jobs that use them, direction
fit and ood fit --reference, run end to end in tests/integration)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath

import pytest

from pipeline.config import validate
from pipeline.data.claims import Claims
from pipeline.data.outputs import OutputStore
from pipeline.data.shards import ShardRef
from pipeline.errors import StorageError
from pipeline.runtime.envelope import run_job
from pipeline.runtime.job import Built, Job, SubRun


def shards(cfg) -> list[ShardRef]:
    return [ShardRef(f"{cfg.input.uri}/{name}.tar", name) for name in ("a", "b")]


def build(run, mine):
    """Each shard's one PARTIAL row names it; the job's merge keeps them in its run's state."""
    run.state["partials"] = []
    run.state["events"].append(f"{run.job.name} build {run.cfg.input.uri}")
    return Built(dataset=None, provenance=None, on_partial=run.state["partials"].append)


@pytest.fixture
def no_ray(monkeypatch):
    """The driver's part without Ray: each shard sends its PARTIAL row, then commits (an empty shard)."""

    def write_and_commit(run, built, mine):
        for s in mine:
            built.on_partial(json.dumps({"input": run.cfg.input.uri, "shard": s.name}).encode())
            record = run.ledger.commit(s.name, s.uri, [], run.job.name, run.cfg.config_hash(), 0, {}, run.job.commits)
            assert not record.get("lost")
        return {}

    monkeypatch.setattr("pipeline.runtime.ray_env.init_ray", lambda: None)
    monkeypatch.setattr("pipeline.runtime.driver.write_and_commit", write_and_commit)
    monkeypatch.setattr("pipeline.runtime.envelope._add_totals", lambda summary, totals: None)


def jobs(events: list, fail_finish: list | None = None, skip_committed: bool = False):
    """A parent over in/ with a sub-run over other/ before its finish and one over third/ after it,
    and a third it declares but does not need."""
    fail_finish = fail_finish if fail_finish is not None else []

    def child_finish(run):
        events.append(f"child finish {run.cfg.input.uri}")
        if run.cfg.input.uri.endswith("broken"):
            raise StorageError("the child cannot finish")

    def parent_finish(run):
        events.append("parent finish")
        if fail_finish:
            raise fail_finish.pop()

    def state(run):
        run.state["events"] = events
        return None

    child = Job(name="child", command=("child",), help="", requires=(), units=shards, build=build, commits=(),
                skip_committed=False, prepare=state, finish=child_finish)

    def beside_input(run, name: str) -> str:
        return posixpath.join(posixpath.dirname(run.cfg.input.uri), name)

    def other(run, cfg):
        cfg.input.uri = beside_input(run, run.options.get("other") or "other")
        return cfg

    def third(run, cfg):
        cfg.input.uri = beside_input(run, "third")
        return cfg

    def take(name):
        def hand_over(parent, sub):
            events.append(f"{name} handed over")
            parent.state[name] = sub
        return hand_over

    return Job(name="parent", command=("parent",), help="", requires=(), units=shards, build=build, commits=(),
               skip_committed=skip_committed, claim_up_front=True, prepare=state, finish=parent_finish,
               subruns=(SubRun("examples", other, take("examples"), job=child),
                        SubRun("report/after", third, take("after"), job=child, after="finish"),
                        SubRun("never", lambda run, cfg: None, take("never"), job=child)))


def config(tmp_path):
    return validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")}})


def partials(run) -> list[dict]:
    return [json.loads(p) for p in run.state["partials"]]


def test_sub_runs_run_in_order_under_their_folders_and_hand_over_in_memory(tmp_path, no_ray):
    events, seen = [], {}
    parent = jobs(events)
    finish = parent.finish

    def keep(run):
        finish(run)
        seen.update(run.state)

    parent = dataclasses.replace(parent, finish=keep)
    out = io.StringIO()
    summary = run_job(parent, config(tmp_path), out=out)
    other, third = str(tmp_path / "other"), str(tmp_path / "third")
    assert events == [f"parent build {tmp_path / 'in'}",
                      f"child build {other}", f"child finish {other}", "examples handed over",
                      "parent finish",
                      f"child build {third}", f"child finish {third}", "after handed over"]
    # the finished sub-run itself, with what its hooks gathered: no file carries it across
    sub = seen["examples"]
    assert sub.finished and sub.job.name == "child" and sub.cfg.output.uri == str(tmp_path / "out" / "examples")
    assert partials(sub) == [{"input": other, "shard": "a"}, {"input": other, "shard": "b"}]
    assert "never" not in seen and not (tmp_path / "out" / "never").exists()
    # each sub-run keeps a ledger and a run record of its own under its folder, and nothing else
    for folder, run_id in (("examples", sub.run_id), ("report/after", None)):
        ledger = tmp_path / "out" / folder / "_ledger"
        assert sorted(os.listdir(tmp_path / "out" / folder)) == ["_ledger"]
        records = [json.loads((ledger / f"{s}.json").read_text()) for s in ("a", "b")]
        assert {r["job"] for r in records} == {"child"}
        assert run_id is None or {r["run_id"] for r in records} == {run_id}
        assert len(os.listdir(ledger / "runs")) == 1
    assert json.loads((tmp_path / "out" / "_ledger" / "a.json").read_text())["run_id"] == summary["run_id"]
    # every run prints its summary: the sub-runs' as they end, the parent's last
    heads = [line.split("  run ")[0] for line in out.getvalue().splitlines() if line.startswith("latentshift ")]
    assert heads == ["latentshift child", "latentshift child", "latentshift parent"]


def test_a_parent_resumed_after_its_sub_run_committed_redoes_the_sub_run_and_hands_it_over(tmp_path, no_ray):
    """Run 1 commits its shards and its sub-run's, then its finish fails; run 2 skips its committed
    shards, and does the sub-run again in full: a committed shard would hand nothing over."""
    events = []
    parent = jobs(events, fail_finish=[RuntimeError("the finish fails once")], skip_committed=True)
    cfg = config(tmp_path)
    with pytest.raises(RuntimeError, match="fails once"):
        run_job(parent, cfg, out=io.StringIO())
    ledger = tmp_path / "out" / "examples" / "_ledger"
    first = {json.loads((ledger / f"{s}.json").read_text())["run_id"] for s in ("a", "b")}
    assert not (tmp_path / "out" / "report").exists()  # the sub-run after the finish never started

    events.clear()
    seen = {}
    finish = parent.finish

    def keep(run):
        finish(run)
        seen.update(run.state)

    summary = run_job(dataclasses.replace(parent, finish=keep), cfg, out=io.StringIO())
    assert summary["shards_skipped"] == 2 and f"parent build {tmp_path / 'in'}" not in events
    again = {json.loads((ledger / f"{s}.json").read_text())["run_id"] for s in ("a", "b")}
    assert again == {seen["examples"].run_id} and again != first
    assert [p["shard"] for p in partials(seen["examples"])] == ["a", "b"]
    assert len(os.listdir(ledger / "runs")) == 2


def test_a_sub_run_that_fails_fails_its_parent_before_the_finish(tmp_path, no_ray):
    events = []
    parent = jobs(events)
    with pytest.raises(StorageError, match="the child cannot finish"):
        run_job(parent, config(tmp_path), out=io.StringIO(), other="broken")
    assert "parent finish" not in events and not (tmp_path / "out" / "_ledger" / "runs").exists()


def test_a_sub_run_whose_shards_another_run_holds_stops_its_parent_in_one_line(tmp_path, no_ray):
    events = []
    store = OutputStore(str(tmp_path / "out" / "examples"), {})
    claims = Claims(store, "busy-run")
    claims.renew()
    assert claims.take("a")
    out = io.StringIO()
    with pytest.raises(StorageError, match="another run of parent is doing this part now"):
        run_job(jobs(events), config(tmp_path), out=out)
    assert "nothing to do here" in out.getvalue() and "parent finish" not in events
