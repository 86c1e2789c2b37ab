"""Overlapping runs on one output prefix (issue 11.12): shard claims let them share the work, a
live run's staging is never touched, and a run that finds every shard taken says so in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from shard_builders import good_samples, tar_bytes
from test_pipeline import all_keys, translate_config

from pipeline.config import validate
from pipeline.data.claims import Claims
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.jobs import run_job


@pytest.fixture
def bucket(s3):
    name = f"overlap-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


def local_config(tmp_path, model, shards: int = 3, **sections) -> dict:
    (tmp_path / "in").mkdir()
    for s in range(shards):
        (tmp_path / "in" / f"shard-{s}.tar").write_bytes(tar_bytes(good_samples(s, 2)))
    return {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
            "source": {"model": str(model)}, "target": {"model": str(model)}, "image": {"size": 16}, **sections}


def busy_run(store: OutputStore, shards: list[str], run_id: str = "busy-run") -> Claims:
    """Another run, alive (its lease has not run out), holding ``shards``, with staging of its own."""
    claims = Claims(store, run_id)
    claims.renew()
    for s in shards:
        assert claims.take(s)
        ShardLedger(store, run_id).expect(s, 2)
    return claims


def test_a_run_that_finds_every_shard_taken_says_so_in_one_line_and_touches_nothing(tmp_path, pixel_model):
    cfg = validate(local_config(tmp_path, pixel_model))
    store = OutputStore(cfg.output.uri, {})
    busy_run(store, ["shard-0", "shard-1", "shard-2"])
    out = io.StringIO()
    summary = run_job(cfg, "translate", out=out)  # (no Ray: it ends before any is needed)
    assert out.getvalue().count("\n") == 1
    assert "nothing to do here: the 3 shard(s) left are being done by run busy-run" in out.getvalue()
    assert summary["shards_done"] == 0 and summary["shards_elsewhere"] == 3 and "incomplete_shards" not in summary
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"_claims", "_leases", "_staging", "_ledger"}
    assert [p.name for p in (tmp_path / "out" / "_staging").iterdir()] == ["busy-run"]  # its staging stays
    assert [p.name for p in (tmp_path / "out" / "_leases").iterdir()] == ["busy-run.json"]  # ours is gone
    assert not (tmp_path / "out" / "_ledger" / "runs").exists()


def test_a_fit_takes_all_of_its_input_or_none(tmp_path, pixel_model):
    """A fit covers every shard: with one held by a live run it must not fit the rest."""
    cfg = validate(local_config(tmp_path, pixel_model, ood={"t0": 500, "inversion_steps": 4}))
    store = OutputStore(cfg.output.uri, {})
    busy_run(store, ["shard-1"])
    out = io.StringIO()
    summary = run_job(cfg, "ood-fit", out=out)
    assert "nothing to do here" in out.getvalue() and summary["shards_elsewhere"] == 3
    assert Claims(store, "x").held_elsewhere(["shard-0", "shard-1", "shard-2"]) == {"shard-1": "busy-run"}
    assert not (tmp_path / "out" / "stats").exists()


def test_two_overlapping_runs_on_one_output_do_each_shard_once(s3, s3_server, bucket, tmp_path, pixel_model,
                                                                  other_pixel_model):
    """Issue 11.12, as a scheduled translation fires twice: two CLI runs, each on its own Ray (two
    RayJobs), over the same S3 input and output, the second started while the first is at work.
    (Readers racing for one shard: tests/unit/test_claims.py.)"""
    for s in range(6):
        s3.pipe_file(f"{bucket}/in/shard-{s}.tar", tar_bytes(good_samples(30 + s, 4)))
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(translate_config(bucket, s3_server, pixel_model, other_pixel_model,
                                                  sampler={"steps": 40})))
    env = dict(os.environ, RAY_ADDRESS="local")  # each run starts a Ray of its own
    exe = Path(sys.executable).parent / "latentshift"
    def start() -> subprocess.Popen:
        return subprocess.Popen([str(exe), "translate", "--config", str(config)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    runs = [start()]
    deadline = time.time() + 240
    while not s3.find(f"{bucket}/out/_claims"):  # the second fires while the first is at work, as in the issue
        assert runs[0].poll() is None and time.time() < deadline, runs[0].communicate()
        time.sleep(0.2)
    runs.append(start())
    outs = [p.communicate(timeout=600) for p in runs]
    s3.invalidate_cache()  # (the wait above cached a listing of _claims/)
    for p, (out, err) in zip(runs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert sorted(all_keys(s3, f"{bucket}/out/images")) == sorted(f"s{30 + s:02d}-{i:03d}" for s in range(6) for i in range(4))
    records = [json.loads(s3.cat_file(p)) for p in s3.find(f"{bucket}/out/_ledger/runs")]
    assert sum(r["shards_done"] for r in records) == 6  # each shard done once: no run redid another's
    for r in records:  # a run that did some says what it left to the other
        assert r["shards_done"] + r["shards_elsewhere"] == 6 and "incomplete_shards" not in r
    if len(records) == 1:  # the other found every shard taken before it started any work: one line
        assert any("nothing to do here" in out and "being done by run" in out for out, _ in outs), outs
    ledgers = [json.loads(s3.cat_file(p)) for p in s3.find(f"{bucket}/out/_ledger") if "/runs/" not in p]
    assert len(ledgers) == 6 and {r["run_id"] for r in ledgers} <= {r["run_id"] for r in records}
    assert s3.find(f"{bucket}/out/_staging") == [] and s3.find(f"{bucket}/out/_claims") == []
    assert s3.find(f"{bucket}/out/_leases") == []
