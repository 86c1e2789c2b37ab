"""Shard claims (pipeline/data/claims.py) on a local store and on a real S3 API (moto server):
one winner per race, a dead run's shards taken over, a live run's never."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.data.claims import Claims, keep_alive, machine
from pipeline.data.filesystems import create_exclusive
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return OutputStore(str(tmp_path / "out"), {})
    s3_server = request.getfixturevalue("s3_server")
    s3 = request.getfixturevalue("s3")
    bucket = f"claims-{uuid.uuid4().hex[:10]}"
    s3.mkdir(bucket)
    return OutputStore(f"s3://{bucket}/out", {"endpoint_url": s3_server})


def lease(store, run_id: str, expires_in: float, machine_id: str = "another-host//", pid: int = 1) -> None:
    """A lease as another run's driver writes it."""
    now = time.time()
    store.put_json(store.lease(run_id), {"run_id": run_id, "machine": machine_id, "pid": pid, "pid_started": 0.0,
                                         "renewed_at": now, "expires_at": now + expires_in})


def race(fns) -> list:
    """Call every fn at once (as far as threads allow); their results in order."""
    start, results = threading.Barrier(len(fns)), [None] * len(fns)

    def go(i, fn):
        start.wait()
        results[i] = fn()

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_exclusive_create_has_exactly_one_winner(store):
    path = store.path("_claims", "s", "0.json")
    won = race([lambda i=i: create_exclusive(store.fs, path, f"writer {i}".encode()) for i in range(12)])
    assert won.count(True) == 1
    assert store.get(path) == f"writer {won.index(True)}".encode()  # the winner's bytes, whole
    assert create_exclusive(store.fs, path, b"late") is False and store.get(path) != b"late"


def test_runs_racing_for_a_shard_get_it_once(store):
    runs = [Claims(store, f"run-{i}") for i in range(8)]
    for c in runs:
        lease(store, c.run_id, expires_in=300)
    won = race([lambda c=c: c.take("s") for c in runs])
    assert won.count(True) == 1
    winner = runs[won.index(True)]
    assert all(c.holder("s") == winner.run_id for c in runs)
    assert [c.holds("s") for c in runs] == won
    assert winner.take("s")  # taking again (a retried read task) keeps it


def test_a_live_run_keeps_its_shards_and_its_staging(store):
    lease(store, "live", expires_in=300)
    assert Claims(store, "live").take("s")
    ShardLedger(store, "live").expect("s", 1)
    other = ShardLedger(store, "other")
    assert not other.begin("s")
    assert other.claims.held_elsewhere(["s", "t"]) == {"s": "live"}
    other.claims.release("s")  # not its claim: nothing happens
    assert other.clear_dead_staging() == [] and other.expected_rows("s") is None
    assert ShardLedger(store, "live").expected_rows("s") == 1


def test_a_dead_runs_shard_is_taken_over_and_its_commit_refused(store):
    lease(store, "killed", expires_in=-1)  # its last heartbeat is older than its lease
    killed, next_run = ShardLedger(store, "killed"), ShardLedger(store, "next")
    assert killed.begin("s")  # (claimed while it was alive)
    killed.expect("s", 1)
    assert next_run.claims.held_elsewhere(["s"]) == {}
    assert next_run.begin("s")
    assert store.find(store.claims("s"))[-1].endswith("/1.json")  # the next generation
    assert not killed.claims.holds("s") and next_run.claims.holds("s")
    assert killed.commit("s", "in/s.tar", [], "translate", "h", 1, {}) == {"shard": "s", "lost": True}
    assert not store.exists(store.ledger("s"))
    killed.claims.release("s")  # a zombie giving up leaves the new holder's claim alone
    assert next_run.claims.holds("s")
    assert next_run.clear_dead_staging() == ["killed"]
    assert not store.exists(store.lease("killed"))
    next_run.claims.release("s")
    assert store.find(store.claims()) == []


def test_a_run_whose_driver_is_gone_from_this_machine_is_dead_before_its_lease_runs_out(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease(store, "gone", expires_in=300, machine_id=machine(), pid=int(gone.stdout))
    lease(store, "elsewhere", expires_in=300, pid=int(gone.stdout))  # same pid, another machine: its lease decides
    me = Claims(store, "me")
    assert not me.alive("gone") and me.alive("elsewhere") and me.alive("me")
    assert me.dead_runs(["gone", "elsewhere", "never-started"]) == ["gone", "never-started"]


def test_keep_alive_renews_the_lease_and_removes_it_at_the_end(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    claims = Claims(store, "beating", lease_seconds=4)  # renewed every second
    with keep_alive(claims):
        first = json.loads(store.get(store.lease("beating")))
        assert first["expires_at"] == pytest.approx(first["renewed_at"] + 4)
        time.sleep(2.5)
        later = json.loads(store.get(store.lease("beating")))
        assert later["renewed_at"] >= first["renewed_at"] + 0.9
        assert Claims(store, "other").alive("beating")
    assert not store.exists(store.lease("beating"))
    assert not Claims(store, "other").alive("beating")


def test_the_output_probe_reports_a_store_that_ignores_conditional_writes(store, monkeypatch, caplog):
    import pipeline.data.outputs as outputs
    from pipeline.data.filesystems import put_bytes

    with caplog.at_level(logging.WARNING, logger="pipeline.data.outputs"):
        store.probe_writable()  # the local store and moto's S3 both honour them
        assert caplog.text == ""
        # a server that drops If-None-Match: every create overwrites and reports success
        monkeypatch.setattr(outputs, "create_exclusive", lambda fs, path, data: put_bytes(fs, path, data) or True)
        store.probe_writable()
    assert "ignored a conditional write (If-None-Match)" in caplog.text
    assert store.find(store.path("_ledger")) == []  # the probe leaves nothing behind


def test_held_elsewhere_over_many_claimed_shards_reads_each_top_once(store):
    """Claimed shards' top generations are read in parallel; the answer is each shard's top run,
    kept only when that run is alive and not this one."""
    lease(store, "live", expires_in=300)
    lease(store, "dead", expires_in=-1)
    shards = [f"s{i:03d}" for i in range(40)]
    for i, shard in enumerate(shards):
        owner = ("live", "dead", "me")[i % 3]
        assert Claims(store, owner).take(shard)
    Claims(store, "dead").release(shards[1])  # released: not claimed any more
    me = Claims(store, "me")
    held = me.held_elsewhere([*shards, "never-claimed"])
    assert held == {s: "live" for i, s in enumerate(shards) if i % 3 == 0}
    assert me.held_elsewhere(["never-claimed"]) == {}
