"""The Ray Data pipeline end to end: a real local Ray, a real S3 server, tiny real models."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TEST_SECRET
from PIL import Image
from shard_builders import REJECTED_ODD, VALID_ODD, good_samples, odd_samples, tar_bytes, truncated

from pipeline.config import validate
from pipeline.data.latents import read_latents
from pipeline.data.shards import iter_tar_samples
from pipeline.errors import ConfigError, StorageError
from pipeline.jobs import run_job


def tar_members(data: bytes) -> dict[str, dict[str, bytes]]:
    out = {}
    for s in iter_tar_samples(io.BytesIO(data)):
        assert not isinstance(s, Exception), s
        assert s.key not in out, f"duplicate key {s.key}"
        out[s.key] = s.members
    return out


def all_keys(fs, prefix: str) -> list[str]:
    keys = []
    for path in sorted(fs.find(prefix)):
        if path.endswith(".tar"):
            keys += list(tar_members(fs.cat_file(path)))
    return keys


@pytest.fixture
def bucket(s3):
    name = f"run-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


def translate_config(bucket, endpoint, source, target, **overrides) -> dict:
    opts = {"endpoint_url": endpoint}
    cfg = {
        "input": {"uri": f"s3://{bucket}/in/", "storage_options": opts},
        "output": {"uri": f"s3://{bucket}/out", "storage_options": opts},
        "source": {"model": str(source)},
        "target": {"model": str(target)},
        "sampler": {"steps": 8, "eta": 0.5, "strength": 0.6},
        "image": {"size": 16},
        "runtime": {"batch_size": 4, "actors": 1},
    }
    for k, v in overrides.items():
        cfg[k].update(v)
    return cfg


def test_translate_s3_to_s3_exactly_once_with_rejects(ray_cluster, s3, s3_server, bucket, pixel_model,
                                                      other_pixel_model, capfd):
    shard_a = good_samples(0, 5) + odd_samples()
    shard_b = good_samples(1, 4)
    s3.pipe(f"{bucket}/in/shard-a.tar", tar_bytes(shard_a))
    s3.pipe(f"{bucket}/in/shard-b.tar", truncated(tar_bytes(shard_b), keep_samples=2))
    s3.pipe(f"{bucket}/in/notes.txt", b"not a shard: ignored")
    cfg = validate(translate_config(bucket, s3_server, pixel_model, other_pixel_model))

    summary = run_job(cfg, "translate")

    # every valid key exactly once, in its own shard's output, with its metadata carried through
    out_a = tar_members(s3.cat_file(f"{bucket}/out/images/shard-a.tar"))
    out_b = tar_members(s3.cat_file(f"{bucket}/out/images/shard-b.tar"))
    valid_a = [k for k, _ in shard_a if k not in REJECTED_ODD]
    assert list(out_a) == valid_a  # input order
    assert list(out_b) == [k for k, _ in shard_b[:2]]
    inputs = dict(shard_a + shard_b)
    for key, members in {**out_a, **out_b}.items():
        for ext in ("json", "txt", "cls"):
            if ext in inputs[key]:
                assert members[ext] == inputs[key][ext]
        img = np.asarray(Image.open(io.BytesIO(members["png"])))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
        prov = json.loads(members["latentshift.json"])
        assert prov["source_model"] == str(pixel_model) and prov["target_model"] == str(other_pixel_model)
        assert prov["source_shard"] in ("shard-a", "shard-b") and prov["key"] == key
        assert prov["noise"] == "threefry2x32-20+box-muller"  # which generator drew the latent
        assert 0 < prov["psnr"] < 60 and -1 <= prov["ssim"] <= 1  # translated, not copied
    assert VALID_ODD <= set(out_a)

    # rejects recorded with reasons; the rest of the run intact
    rej_a = [json.loads(line) for line in s3.cat_file(f"{bucket}/out/_rejects/shard-a.jsonl").splitlines()]
    assert {r["key"]: r["reason"].split(":")[0] for r in rej_a} == {
        "bad-corrupt": "undecodable image", "bad-noimage": "no image member (has 'bad-noimage.json')"}
    rej_b = [json.loads(line) for line in s3.cat_file(f"{bucket}/out/_rejects/shard-b.jsonl").splitlines()]
    assert len(rej_b) == 1 and rej_b[0]["reason"].startswith("corrupt or truncated tar after key 's01-001'")

    # latents: plain pyarrow → numpy of the documented shape; read_latents regroups them
    table = pq.read_table(s3.open(f"{bucket}/out/latents/shard-a.parquet"))
    assert {"key", "shard", "model", "method", "timesteps", "eta", "cond", "seed", "step", "shape", "latent"} <= set(table.column_names)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["method"] == "dpm" and row["timesteps"] == [375, 250, 125, 0] and row["dtype"] == "float16"
    assert np.frombuffer(row["latent"], row["dtype"]).reshape(row["shape"]).shape == (3, 16, 16)
    assert table.num_rows == len(valid_a) * 5  # x_start + 4 noises per sample
    latents = dict(read_latents(f"s3://{bucket}/out/latents/", {"endpoint_url": s3_server}))
    assert set(latents) == set(out_a) | set(out_b)
    z = latents["s00-001"]
    assert z.x_start.shape == (3, 16, 16) and z.noise.shape == (4, 3, 16, 16) and z.maps.dtype == np.float16

    # ledger and summary
    ledger = {n: json.loads(s3.cat_file(f"{bucket}/out/_ledger/{n}.json")) for n in ("shard-a", "shard-b")}
    assert ledger["shard-a"]["images"] == len(valid_a) and ledger["shard-a"]["rejected"] == 2
    assert ledger["shard-b"]["images"] == 2 and ledger["shard-b"]["rejected"] == 1
    assert summary["shards_done"] == 2 and summary["images"] == len(valid_a) + 2 and summary["rejected"] == 3
    assert "mean_psnr" in summary and summary["latent_bytes_per_image"] > 0
    assert not s3.exists(f"{bucket}/out/_staging/{summary['run_id']}")

    # the secret in the environment appears in no output object and no log line
    for path in s3.find(f"{bucket}/out"):
        assert TEST_SECRET.encode() not in s3.cat_file(path), path
    logs = capfd.readouterr()
    assert TEST_SECRET not in logs.out + logs.err
    ray_logs = Path("/tmp/ray/session_latest/logs")  # this session's workers, raylet, GCS
    for f in (p for p in ray_logs.rglob("*") if p.is_file()):
        assert TEST_SECRET.encode() not in f.read_bytes(), f

    # re-run: no model work (a missing target model is never loaded), outputs byte-identical
    before = {p: s3.cat_file(p) for p in s3.find(f"{bucket}/out") if "/_ledger/runs/" not in p}
    broken = validate(translate_config(bucket, s3_server, "/nonexistent/source", "/nonexistent/target"))
    again = run_job(broken, "translate")
    assert again["shards_done"] == 0 and again["shards_skipped"] == 2
    assert {p: s3.cat_file(p) for p in s3.find(f"{bucket}/out") if "/_ledger/runs/" not in p} == before

    # a new shard under the prefix is picked up alone (scheduled translations)
    s3.pipe(f"{bucket}/in/shard-c.tar", tar_bytes(good_samples(2, 3)))
    third = run_job(cfg, "translate")
    assert third["shards_done"] == 1 and third["shards_skipped"] == 2
    s3.invalidate_cache()
    assert json.loads(s3.cat_file(f"{bucket}/out/_ledger/shard-c.json"))["run_id"] == third["run_id"]
    assert json.loads(s3.cat_file(f"{bucket}/out/_ledger/shard-a.json"))["run_id"] == summary["run_id"]
    keys = all_keys(s3, f"{bucket}/out/images")
    assert len(keys) == len(set(keys)) == len(valid_a) + 2 + 3


def test_encode_then_decode_reproduces_the_inputs(ray_cluster, tmp_path, pixel_model):
    from pipeline.data.shards import write_samples

    (tmp_path / "in").mkdir()
    samples = good_samples(5, 6)
    with open(tmp_path / "in" / "shard-000.tar", "wb") as f:
        write_samples(f, samples)
    base = {"source": {"model": str(pixel_model)}, "target": {"model": str(pixel_model)},
            "sampler": {"steps": 10, "eta": 0.3, "strength": 0.7}, "image": {"size": 16}, "runtime": {"batch_size": 4}}
    enc = validate({**base, "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "enc")}})
    s = run_job(enc, "encode")
    assert s["latent_samples"] == 6 and s["images"] == 0
    assert not (tmp_path / "enc" / "images").exists()
    assert run_job(enc, "encode")["shards_done"] == 0
    in_tasks = pq.read_table(tmp_path / "enc" / "latents" / "shard-000.parquet").sort_by("key")
    # --overwrite redoes committed shards; here on an actor (runtime.pool auto is tasks on this one-node Ray)
    on_actor = validate({**base, "runtime": {"batch_size": 4, "pool": "actors"}, "input": {"uri": str(tmp_path / "in")},
                         "output": {"uri": str(tmp_path / "enc")}})
    redo = run_job(on_actor, "encode", overwrite=True)
    assert redo["shards_done"] == 1 and redo["latent_samples"] == 6
    on_actor_table = pq.read_table(tmp_path / "enc" / "latents" / "shard-000.parquet").sort_by("key")
    assert on_actor_table["key"].to_pylist() == in_tasks["key"].to_pylist()
    for a, b, dtype in zip(on_actor_table["latent"].to_pylist(), in_tasks["latent"].to_pylist(),
                           in_tasks["dtype"].to_pylist(), strict=True):
        # the same latents to rounding: an actor's torch runs 1 thread, a task the node's cores, and a
        # convolution's sums are ordered by its threads; stored as float16 here, that is an ulp (≤ 2⁻¹⁰ relative)
        np.testing.assert_allclose(np.frombuffer(a, dtype), np.frombuffer(b, dtype), rtol=2e-3, atol=1e-3)

    for source in (tmp_path / "enc", tmp_path / "enc" / "latents"):  # the run's output, or its latents/ folder
        out = tmp_path / f"dec-{source.name}"
        dec = validate({**base, "input": {"uri": str(source)}, "output": {"uri": str(out)}})
        d = run_job(dec, "decode")
        assert d["images"] == 6 and d["rejected"] == 0
        decoded = tar_members((out / "images" / "shard-000.tar").read_bytes())
        for key, members in samples:
            a = np.asarray(Image.open(io.BytesIO(members["png"]))).astype(np.float64)
            b = np.asarray(Image.open(io.BytesIO(decoded[key]["png"]))).astype(np.float64)
            mse = ((a - b) ** 2).mean()
            assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40, key


def test_ddim_encode_then_decode_through_the_pipeline(ray_cluster, tmp_path, pixel_model):
    from pipeline.data.shards import write_samples

    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "d.tar", "wb") as f:
        write_samples(f, good_samples(6, 3))
    base = {"source": {"model": str(pixel_model)}, "target": {"model": str(pixel_model)}, "image": {"size": 16},
            "sampler": {"method": "ddim", "eta": 0.0, "steps": 20, "strength": 0.5}}
    run_job(validate({**base, "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "enc")}}),
            "encode")
    table = pq.read_table(tmp_path / "enc" / "latents" / "d.parquet")
    assert set(table["method"].to_pylist()) == {"ddim"} and table.num_rows == 3  # x_start only
    assert table["timesteps"][0].as_py()[0] == 450  # last 10 of the 20-step grid 950…0
    d = run_job(validate({**base, "input": {"uri": str(tmp_path / "enc")}, "output": {"uri": str(tmp_path / "dec")}}),
                "decode")
    assert d["images"] == 3 and d["rejected"] == 0
    prov = json.loads(tar_members((tmp_path / "dec" / "images" / "d.tar").read_bytes())["s06-000"]["latentshift.json"])
    assert prov["method"] == "ddim" and prov["source_model"] == str(pixel_model)


def test_bad_config_and_unreachable_storage_fail_before_any_model(ray_cluster, s3, s3_server, bucket, tmp_path):
    # the models do not exist: any attempt to load one would raise ModelLoadError instead
    cfg = translate_config(bucket, s3_server, "/nonexistent/a", "/nonexistent/b")
    cfg["input"]["uri"] = "s3://no-such-bucket-zz/in/"
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-zz/in/: not found") as err:
        run_job(validate(cfg), "translate")
    assert TEST_SECRET not in str(err.value)
    s3.pipe(f"{bucket}/in/x.tar", tar_bytes(good_samples(0, 1)))
    cfg = translate_config(bucket, s3_server, "/nonexistent/a", "/nonexistent/b")
    cfg["output"]["uri"] = "s3://no-such-bucket-zz/out"
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-zz/out: not found"):
        run_job(validate(cfg), "translate")
    cfg = translate_config(bucket, s3_server, "/nonexistent/a", "/nonexistent/b")
    cfg["target"]["model"] = None
    with pytest.raises(ConfigError, match=r"target\.model is not set"):
        run_job(validate(cfg), "translate")
    cfg = translate_config(bucket, s3_server, "/nonexistent/a", "/nonexistent/b")
    cfg["input"]["uri"] = f"s3://{bucket}/empty/"
    with pytest.raises(StorageError, match="no .tar shards found"):
        run_job(validate(cfg), "translate")


def test_killed_run_is_finished_by_the_next_exactly_once(ray_cluster, tmp_path, pixel_model, other_pixel_model):
    import ray

    from pipeline.data.shards import write_samples

    (tmp_path / "in").mkdir()
    for s in range(4):
        with open(tmp_path / "in" / f"shard-{s}.tar", "wb") as f:
            write_samples(f, good_samples(10 + s, 6))
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "source": {"model": str(pixel_model)}, "target": {"model": str(other_pixel_model)},
        "sampler": {"steps": 100, "eta": 0.5, "strength": 1.0}, "image": {"size": 16},
        "runtime": {"batch_size": 3},  # 100 steps: seconds a shard, so the kill lands between commits
    }))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    exe = Path(sys.executable).parent / "latentshift"
    proc = subprocess.Popen([str(exe), "translate", "--config", str(config)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = tmp_path / "out" / "_ledger"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ledger.glob("shard-*.json")):
        assert proc.poll() is None, "the run ended before any shard committed: make it slower"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed_before = {p.name for p in ledger.glob("shard-*.json")}
    assert 1 <= len(committed_before) < 4

    from pipeline.config import load_config

    summary = run_job(load_config(config), "translate")
    assert summary["shards_skipped"] == len(committed_before)
    assert summary["shards_done"] == 4 - len(committed_before)
    keys = []
    for tar in sorted((tmp_path / "out" / "images").glob("*.tar")):
        keys += list(tar_members(tar.read_bytes()))
    assert sorted(keys) == sorted(f"s{10 + s:02d}-{i:03d}" for s in range(4) for i in range(6))
    assert not list((tmp_path / "out" / "images").glob("*.tmp-*"))


def test_storage_faults_are_retried_and_nothing_is_lost(ray_cluster, s3, s3_server, bucket, pixel_model,
                                                        other_pixel_model):
    from fault_proxy import FaultProxy

    for s in range(3):
        s3.pipe(f"{bucket}/in/shard-{s}.tar", tar_bytes(good_samples(20 + s, 4)))
    with FaultProxy(s3_server, failure_rate=0.2, seed=1) as proxy:
        cfg = validate(translate_config(bucket, proxy.url, pixel_model, other_pixel_model,
                                        sampler={"steps": 4, "strength": 0.5}))
        summary = run_job(cfg, "translate")
    assert proxy.failures > 10 and proxy.requests > 50, (proxy.failures, proxy.requests)
    assert summary["shards_done"] == 3 and summary["images"] == 12 and summary["rejected"] == 0
    s3.invalidate_cache()
    keys = all_keys(s3, f"{bucket}/out/images")
    assert sorted(keys) == sorted(f"s{20 + s:02d}-{i:03d}" for s in range(3) for i in range(4))
    assert len(s3.find(f"{bucket}/out/latents")) == 3


def test_every_input_member_ends_up_in_an_output_sample_a_carried_member_or_a_reject_line(
        ray_cluster, tmp_path, pixel_model, other_pixel_model):
    """The accounting rule end to end: counts in = out + rejected + dropped, each dropped member named."""
    import re

    from shard_builders import png, raw_tar, rgb_image

    good = png(rgb_image(3))
    members = [("a.png", good), ("a.json", b"{}"), ("a.pkl", b"never carried"), ("noext", b"x"),
               ("b.png", good), ("b.jpg", b"not really a jpeg"), ("b.txt", b"t"),
               ("../../evil.png", good), ("link.png", "a.png"), ("c.png", b""), ("c.cls", b"1"),
               ("d.png", b"not a png"), ("a.png", good), ("e.png", good), ("e.txt", b"x"), ("e.txt", b"y")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.tar").write_bytes(raw_tar(members))
    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out"), "latents": "none"},
                    "source": {"model": str(pixel_model)}, "target": {"model": str(other_pixel_model)},
                    "sampler": {"steps": 4, "eta": 0.5, "strength": 0.5}, "image": {"size": 16},
                    "runtime": {"batch_size": 4}})
    summary = run_job(cfg, "translate")

    out = tar_members((tmp_path / "out" / "images" / "m.tar").read_bytes())
    written = [f"{k}.{e}" for k, m in out.items() for e in m if e != "latentshift.json"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "_rejects" / "m.jsonl").read_text().splitlines()]
    named = []
    for line in lines:
        if m := re.match(r"dropped member '([^']*)': ", line["reason"]):
            named.append(m.group(1))
        elif m := re.search(r"\(has ([^)]*)\)$", line["reason"]):  # a whole sample: all its members
            named += re.findall(r"'([^']*)'", m.group(1))
    names = [n for n, _ in members]
    assert sorted(written + named) == sorted(names), (written, named)
    assert set(out) == {"a", "e"}  # b's image is b.jpg (first of jpg, jpeg, png, webp), not a JPEG
    dropped = sum(line["reason"].startswith("dropped member") for line in lines)
    assert summary["dropped"] == dropped and summary["rejected"] == len(lines) - dropped
    assert summary["images"] == 2 and summary["outputs"] == ["images", "latents", "scores", "rejects"]
    assert any(line["reason"].startswith("undecodable image") and line["reason"].endswith("(has 'b.jpg', 'b.txt')")
               for line in lines)
