"""Issue 24.4 and 24.5, end to end (local Ray, the S3 server, tiny models): a reject line names the key
it is about and the member at fault, an empty image is "empty image member" in every job, and a
finished run leaves no empty control folder, on local disk or S3, nor removes another run's lease."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from shard_builders import good_samples, png, raw_tar, rgb_image, tar_bytes

from pipeline.config import validate
from pipeline.data.claims import Claims
from pipeline.data.outputs import OutputStore
from pipeline.jobs import run_job
from pipeline.tools.random_clip import save_random_clip

PNG = png(rgb_image(7, 16))

# One shard holding every bad case next to two good samples: one run checks them all.
BAD_MEMBERS = [("empty.png", b""), ("empty.json", b"{}"),  # a 0-byte image: the member is at fault
               ("../x.png", PNG),  # an unsafe key: the sample is at fault, its raw key is the line's key
               (".png", PNG),  # a member whose name has no key part: key "" (as the tar groups it)
               ("lone", b"p")]  # a member with no sample (no extension): its own key, not ""

# (key, member, reason start) of each bad member's line, the same in every job that reads the input
EXPECTED_BAD = [("empty", "empty.png", "empty image member 'empty.png'"),
                ("../x", "", "unsafe key '../x': path traversal"),
                ("", "", "unsafe key '': empty"),
                ("lone", "lone", "dropped member 'lone': no extension")]


def input_shard() -> bytes:
    good = [(f"{key}.{ext}", data) for key, members in good_samples(0, 2) for ext, data in members.items()]
    return raw_tar(good + BAD_MEMBERS)


def reject_lines(read, path: str) -> list[dict]:
    return [json.loads(line) for line in read(path).decode().splitlines()]


def check_bad_lines(lines: list[dict]) -> None:
    assert all(sorted(line) == ["index", "key", "member", "reason", "shard"] for line in lines), lines
    found = [(line["key"], line["member"], line["reason"]) for line in lines]
    for key, member, reason in EXPECTED_BAD:
        assert any(k == key and m == member and r.startswith(reason) for k, m, r in found), (key, found)


def empty_folders(root) -> list[str]:
    return [d for d, subdirs, files in os.walk(root) if not subdirs and not files]


def test_translate_on_local_disk_names_keys_and_members_and_leaves_no_empty_folder(ray_cluster, tmp_path,
                                                                                    pixel_model, other_pixel_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard-0.tar").write_bytes(input_shard())
    out = tmp_path / "out"
    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(out)},
                    "source": {"model": str(pixel_model)}, "target": {"model": str(other_pixel_model)},
                    "sampler": {"steps": 4, "eta": 0.5, "strength": 0.5}, "image": {"size": 16},
                    "runtime": {"batch_size": 4, "actors": 1}})
    busy = Claims(OutputStore(str(out), {}), "busy-run")  # another live run on the same output
    busy.renew()
    summary = run_job(cfg, "translate")
    assert summary["shards_done"] == 1 and summary["images"] == 2
    check_bad_lines(reject_lines(lambda p: open(p, "rb").read(), str(out / "_rejects" / "shard-0.jsonl")))
    assert [p.name for p in (out / "_leases").iterdir()] == ["busy-run.json"]  # its lease is not removed
    busy.end()  # and when the last run on the output ends, _leases/ goes too
    assert not (out / "_leases").exists() and not (out / "_staging").exists() and not (out / "_claims").exists()
    assert empty_folders(out) == []


@pytest.fixture
def bucket(s3):
    name = f"rej-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


def every_object(s3, bucket: str) -> list[str]:
    """Every key in the bucket, folder markers ("…/") included: s3fs's find hides those."""
    client_keys, token = [], None
    while True:
        page = s3.call_s3("list_objects_v2", Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        client_keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return client_keys
        token = page["NextContinuationToken"]


def test_edit_and_score_on_s3_say_empty_image_member_and_leave_no_control_marker(
        ray_cluster, s3, s3_server, bucket, pixel_model, tmp_path):
    opts = {"endpoint_url": s3_server}
    s3.pipe(f"{bucket}/in/shard-0.tar", input_shard())
    s3.pipe(f"{bucket}/red/shard-0.tar", tar_bytes(good_samples(5, 3)))
    hspace = {"direction": f"s3://{bucket}/dirs/d.safetensors", "direction_storage_options": opts,
              "examples": f"s3://{bucket}/red/", "t0": 999, "steps": 4}
    base = {"input": {"uri": f"s3://{bucket}/in/", "storage_options": opts},
            "output": {"uri": f"s3://{bucket}/out", "storage_options": opts, "latents": "none"},
            "source": {"model": str(pixel_model)}, "hspace": hspace, "image": {"size": 16},
            "runtime": {"batch_size": 4, "actors": 1}}
    fit = {**base, "output": {**base["output"], "uri": f"s3://{bucket}/fit"}}  # its own ledger
    run_job(validate(fit), "direction-fit")  # a mean difference: the edit needs a direction that fits the model
    edited = run_job(validate(base), "edit")
    assert edited["shards_done"] == 1 and edited["images"] == 2
    check_bad_lines(reject_lines(s3.cat_file, f"{bucket}/out/_rejects/shard-0.jsonl"))

    # score the edit's output against an input whose image of one key is empty, and whose output is empty
    # for another: both are "empty image member", naming the member; the unsafe key keeps its raw key
    s3.pipe(f"{bucket}/in/shard-0.tar", raw_tar([("s00-000.png", b""), ("s00-001.png", PNG)]))
    s3.pipe(f"{bucket}/out/images/shard-0.tar", raw_tar([("s00-000.png", PNG), ("s00-001.png", b""),
                                                         ("../y.png", PNG)]))
    clip_files = save_random_clip(tmp_path / "clip")
    score = validate({**base, "clip": {"model": clip_files[0], "pretrained": clip_files[1]},
                      "score": {"source_text": "a photo of a cat", "target_text": "a photo of a dog"}})
    scored = run_job(score, "score")
    assert scored["shards_done"] == 1 and scored["rejected"] == 3
    lines = reject_lines(s3.cat_file, f"{bucket}/out/_score/_rejects/shard-0.jsonl")
    assert [(line["key"], line["member"]) for line in lines] == [("s00-000", "s00-000.png"),
                                                                 ("s00-001", "s00-001.png"), ("../y", "")]
    assert lines[0]["reason"].startswith("empty image member 's00-000.png' in input shard ")
    assert lines[1]["reason"].startswith("empty image member 's00-001.png' in output shard ")
    assert lines[2]["reason"].startswith("output shard ") and "unsafe key '../y'" in lines[2]["reason"]

    s3.invalidate_cache()
    objects = every_object(s3, bucket)
    for control in ("_staging", "_claims", "_leases"):
        assert not [k for k in objects if f"/{control}/" in k or k.endswith(f"/{control}")], objects
    assert not [k for k in objects if k.endswith("/")], objects  # no folder marker of any kind
