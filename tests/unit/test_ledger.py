"""The shard ledger's commit rule, on a local output store (no Ray)."""

from __future__ import annotations

import io
import json
import os

from pipeline.data.ledger import CommitTracker, ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.data.shards import iter_tar_samples, write_samples


def tar(samples) -> bytes:
    buf = io.BytesIO()
    write_samples(buf, samples)
    return buf.getvalue()


def part(ledger, shard, items, rejects=()):
    """Stage (index, key) samples and (index, key) rejects as one part, as the writer does."""
    files = {"tar": tar([(k, {"png": f"img-{k}".encode()}) for _, k in items])} if items else {}
    manifest = {"indices": [i for i, _ in [*items, *rejects]], "samples": [[i, k] for i, k in items],
                "rejects": [{"shard": shard, "key": k, "index": i, "reason": "bad"} for i, k in rejects]}
    return ledger.stage_part(shard, files, manifest)


def test_a_shard_commits_when_every_expected_row_is_staged_and_only_then(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ShardLedger(store, "run-1")
    tracker = CommitTracker(ledger, ["s"])
    assert not tracker.complete("s")  # the reader has not said how many rows yet
    assert ledger.begin("s")  # the reader claims its shard first
    ledger.expect("s", 4)
    p1 = part(ledger, "s", [(2, "c"), (0, "a")])
    tracker.add("s", p1, rows=2, latent_rows=0, latent_rows_expected=0)
    assert not tracker.complete("s")
    p2 = part(ledger, "s", [(3, "d")], rejects=[(1, "b")])
    tracker.add("s", p2, rows=2, latent_rows=0, latent_rows_expected=2)
    assert not tracker.complete("s")  # two announced latent rows are missing
    tracker.add("s", p2, rows=0, latent_rows=2, latent_rows_expected=0)
    assert tracker.complete("s") and not store.exists(store.ledger("s"))  # complete is not committed
    record = ledger.commit("s", "in/s.tar", tracker.take("s").parts, "translate", "hash", 4, {})
    assert not tracker.complete("s") and tracker.incomplete() == []

    assert record["images"] == 3 and record["rejected"] == 1 and record["rows_in"] == 4
    assert json.loads(store.get(store.ledger("s")))["run_id"] == "run-1"  # the commit point, written last
    keys = [x.key for x in iter_tar_samples(io.BytesIO(store.get(store.images("s"))))]
    assert keys == ["a", "c", "d"]  # input order, whatever order the parts came in
    assert [json.loads(line)["key"] for line in store.get(store.rejects("s")).decode().splitlines()] == ["b"]
    assert ledger.committed() == {"s"} and not store.exists(store.staging("run-1", "s"))
    assert not ledger.claims.holds("s") and store.find(store.claims()) == []  # the claim is given up
    assert not ShardLedger(store, "later").begin("s")  # a committed shard is not claimed again


def test_a_part_staged_twice_is_taken_once(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ShardLedger(store, "run-2")
    assert ledger.begin("s")
    ledger.expect("s", 2)
    parts = [part(ledger, "s", [(0, "a"), (1, "b")]), part(ledger, "s", [(0, "a"), (1, "b")])]  # a retried task
    record = ledger.commit("s", "in/s.tar", parts, "encode", "hash", 2, {})
    assert record["images"] == 2
    assert [x.key for x in iter_tar_samples(io.BytesIO(store.get(store.images("s"))))] == ["a", "b"]


def test_clearing_dead_staging_forgets_a_killed_runs_parts_and_keeps_a_live_runs(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    old = ShardLedger(store, "killed")  # staged, never renewed a lease: dead
    old.expect("s", 1)
    part(old, "s", [(0, "a")])
    live = ShardLedger(store, "live")
    live.claims.renew()  # a lease that has not run out
    live.expect("t", 1)
    new = ShardLedger(store, "next")
    assert new.clear_dead_staging() == ["killed"]
    assert [p.rsplit("/", 1)[-1] for p in store.listdir(store.path("_staging"))] == ["live"]
    assert new.expected_rows("s") is None and new.committed() == set()


def test_a_sample_keeps_its_own_position_when_its_key_also_has_a_reject_row(tmp_path):
    """Issue 11.5: key 'a' at index 0 is kept, its duplicate at index 2 rejected; 'a' must stay first."""
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ShardLedger(store, "run-3")
    assert ledger.begin("s")
    ledger.expect("s", 3)
    p = part(ledger, "s", [(0, "a"), (1, "b")], rejects=[(2, "a")])
    ledger.commit("s", "in/s.tar", [p], "translate", "hash", 3, {})
    assert [x.key for x in iter_tar_samples(io.BytesIO(store.get(store.images("s"))))] == ["a", "b"]


def test_a_finished_run_leaves_no_staging_folder(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ShardLedger(store, "run-4")
    assert ledger.begin("s")
    ledger.expect("s", 1)
    ledger.commit("s", "in/s.tar", [part(ledger, "s", [(0, "a")])], "encode", "hash", 1, {})
    ledger.finish(["s"])
    assert not (tmp_path / "out" / "_staging").exists() and not (tmp_path / "out" / "_claims").exists()
    other = ShardLedger(store, "live")  # another run's staging is never removed by finish()
    other.expect("t", 1)
    ledger.finish()
    assert (tmp_path / "out" / "_staging" / "live" / "t").is_dir()


def test_dropped_members_are_counted_apart_from_rejected_samples(tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ShardLedger(store, "run-5")
    assert ledger.begin("s")
    ledger.expect("s", 3)
    p = ledger.stage_part("s", {"tar": tar([("a", {"png": b"x"})])}, {
        "indices": [0, 1, 2], "samples": [[1, "a"]],
        "rejects": [{"shard": "s", "key": "a", "index": 0, "reason": "dropped member 'a.pkl': extension 'pkl' not in input.carry"},
                    {"shard": "s", "key": "b", "index": 2, "reason": "no image member (has 'b.txt')"}]})
    record = ledger.commit("s", "in/s.tar", [p], "translate", "hash", 3, {})
    assert record["images"] == 1 and record["rejected"] == 1 and record["dropped"] == 1


def test_a_shard_done_again_keeps_no_file_of_the_run_before(tmp_path):
    """--overwrite: the second commit has every sample rejected and no scores; the images and
    scores of the first are removed with it, and a kind the job does not own is left alone."""
    store = OutputStore(str(tmp_path / "out"), {})
    first = ShardLedger(store, "run-6", redo_committed=True)
    assert first.begin("s")
    first.expect("s", 2)
    first.commit("s", "in/s.tar", [part(first, "s", [(0, "a"), (1, "b")])], "translate", "h", 2, {},
                 owns=("images", "latents", "scores", "rejects"))
    store.put(store.scores("s"), b"scores of the first outputs")
    store.put(store.latents("s"), b"latents of a job that does not own them here")
    assert store.exists(store.images("s")) and not store.exists(store.rejects("s"))

    again = ShardLedger(store, "run-7", redo_committed=True)
    assert again.begin("s")
    again.expect("s", 2)
    record = again.commit("s", "in/s.tar", [part(again, "s", [], rejects=[(0, "a"), (1, "b")])], "translate",
                          "h", 2, {}, owns=("images", "scores", "rejects"))
    assert record["images"] == 0 and record["rejected"] == 2
    assert not store.exists(store.images("s")) and not store.exists(store.scores("s"))
    assert len(store.get(store.rejects("s")).decode().splitlines()) == 2
    assert store.get(store.latents("s")) == b"latents of a job that does not own them here"


def test_a_reject_line_names_the_member_the_reader_said_its_row_is_about(tmp_path):
    """Issue 24.4: the writer's line has shard, key, index and reason; the commit adds ``member`` from the
    reader's record, the same fields in every job (the score job's input image: ``input_members``)."""
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ShardLedger(store, "run-8")
    assert ledger.begin("s")
    ledger.expect("s", 4, members={0: "../x.png", 1: "k.png", 2: "o.png", 3: "p.png"}, input_members={3: "p.jpg"})
    p = ledger.stage_part("s", {}, {"indices": [0, 1, 2, 3], "samples": [], "rejects": [
        {"shard": "s", "key": "../x", "index": 0, "reason": "unsafe key '../x': path traversal (has '../x.png')"},
        {"shard": "s", "key": "k", "index": 1, "reason": "cannot decode image: …"},  # a decode reject of a sample
        {"shard": "s", "key": "o", "index": 2, "reason": "output image of key 'o' (shard 's'): …"},
        {"shard": "s", "key": "p", "index": 3, "reason": "input image of key 'p' (shard 's'): …"}]})
    ledger.commit("s", "in/s.tar", [p], "score", "hash", 4, {})
    lines = [json.loads(line) for line in store.get(store.rejects("s")).decode().splitlines()]
    assert [sorted(line) for line in lines] == [["index", "key", "member", "reason", "shard"]] * 4
    assert [(line["key"], line["member"]) for line in lines] == [
        ("../x", "../x.png"), ("k", "k.png"), ("o", "o.png"), ("p", "p.jpg")]


def test_a_finished_run_leaves_no_empty_control_folder_and_keeps_another_runs_lease(tmp_path):
    """Issue 24.5, local disk: _staging/, _claims/ and _leases/ go once the run emptied them; another
    live run's lease keeps _leases/ (rmdir refuses a folder with a file in it)."""
    from pipeline.data.claims import keep_alive

    store = OutputStore(str(tmp_path / "out"), {}, control="_score")
    ledger = ShardLedger(store, "run-9")
    with keep_alive(ledger.claims):
        assert ledger.begin("s")
        ledger.expect("s", 1)
        ledger.commit("s", "in/s.tar", [part(ledger, "s", [(0, "a")])], "score", "hash", 1, {})
        ledger.finish(["s"])
    control = tmp_path / "out" / "_score"
    assert sorted(p.name for p in control.iterdir()) == ["_ledger"]
    assert not [d for d, subdirs, files in os.walk(tmp_path / "out") if not subdirs and not files]

    other = ShardLedger(store, "live")
    other.claims.renew()
    with keep_alive(ShardLedger(store, "run-10").claims):
        pass
    assert [p.name for p in (control / "_leases").iterdir()] == ["live.json"]


def test_a_write_into_a_folder_removed_meanwhile_makes_it_again(tmp_path, monkeypatch):
    """The race of issue 24.5: another run removes an empty control folder between this run making it
    and writing into it. The write is not lost."""
    import pipeline.data.outputs as outputs
    from pipeline.data.filesystems import create_exclusive, put_bytes

    store = OutputStore(str(tmp_path / "out"), {})
    raced = []

    def racing(write):
        def once(fs, path, data):
            if not raced:  # the folder is made, then removed by the other run before the file lands
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rmdir(os.path.dirname(path))
                raced.append(path)
                raise FileNotFoundError(path)
            return write(fs, path, data)
        return once

    monkeypatch.setattr(outputs, "put_bytes", racing(put_bytes))
    store.put(store.lease("a"), b"{}")
    assert store.get(store.lease("a")) == b"{}"
    raced.clear()
    monkeypatch.setattr(outputs, "create_exclusive", racing(create_exclusive))
    assert store.create(store.claims("s") + "/0.json", b"{}")
    assert store.get(store.claims("s") + "/0.json") == b"{}" and len(raced) == 1
