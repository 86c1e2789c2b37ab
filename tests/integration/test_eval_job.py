"""`latentshift eval` end to end on a real S3 server and local Ray, against clean-fid itself: the same two
image sets, the same (tiny, random-weight) feature network handed to clean-fid as its
``custom_feat_extractor``, the same FID and KID. Then what a scheduled evaluation needs: a re-run measures
only new shards and reuses the reference's statistics until the reference changes; and bad input in one line."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from shard_builders import tar_bytes

from pipeline.cli import main
from pipeline.config import validate
from pipeline.jobs import run_job
from pipeline.metrics import feature_net


def picture(seed: int, size: int, kind: str) -> np.ndarray:
    """A disc or a square of a random colour on a random background: sets whose statistics differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c, r = rng.uniform(size * 0.3, size * 0.7, 2), rng.uniform(size * 0.15, size * 0.3)
    inside = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r) if kind == "disc" else \
        ((abs(yy - c[0]) < r) & (abs(xx - c[1]) < r))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    image[inside] = rng.integers(0, 256, 3)
    return image


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bucket(s3):
    name = f"eval-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory):
    return feature_net.random_tiny(tmp_path_factory.mktemp("net") / "tiny.safetensors", widths=(8, 16), seed=0)


def put_sets(s3, bucket, tmp_path, shards: dict[str, list[np.ndarray]], refs: list[np.ndarray]):
    """The judged images as tar shards in S3, the reference as loose PNG files in S3; both also as local
    folders for clean-fid, named so that its sorted listing is the job's order."""
    for name, images in shards.items():
        samples = [(f"{name}-{i:03d}", {"png": png(im), "json": b"{}"}) for i, im in enumerate(images)]
        s3.pipe(f"{bucket}/gen/{name}.tar", tar_bytes(samples))
        (tmp_path / "gen").mkdir(exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / "gen" / f"{name}-{i:03d}.png")
    (tmp_path / "ref").mkdir(exist_ok=True)
    for i, im in enumerate(refs):
        s3.pipe(f"{bucket}/ref/r{i:03d}.png", png(im))
        Image.fromarray(im).save(tmp_path / "ref" / f"r{i:03d}.png")


def config(bucket, endpoint, net, **eval_overrides) -> dict:
    opts = {"endpoint_url": endpoint}
    return {"input": {"storage_options": opts},
            "output": {"uri": f"s3://{bucket}/out", "storage_options": opts},
            "runtime": {"batch_size": 8, "actors": 1},
            "eval": {"images": f"s3://{bucket}/gen/", "reference": f"s3://{bucket}/ref/",
                     "reference_storage_options": opts, "inception": str(net), "files_per_unit": 16,
                     **eval_overrides}}


def clean_fid_figures(tmp_path, net_file, seed: int) -> tuple[float, float]:
    """clean-fid's own FID (``compute_fid`` with our network as its custom feature extractor) and KID (what
    ``compute_kid`` does with the folders' features, cleanfid/fid.py:392-403, whose extractor cannot be
    swapped: it would download the Inception network), on the local folders."""
    from cleanfid import fid

    net = feature_net.load(net_file)
    common = {"mode": "clean", "num_workers": 0, "batch_size": 8, "device": torch.device("cpu"), "verbose": False}
    score = fid.compute_fid(str(tmp_path / "gen"), str(tmp_path / "ref"), custom_feat_extractor=net, **common)
    f_gen = fid.get_folder_features(str(tmp_path / "gen"), net, **common)
    f_ref = fid.get_folder_features(str(tmp_path / "ref"), net, **common)
    np.random.seed(seed)  # clean-fid draws KID's subsets from numpy's global stream
    return score, fid.kernel_distance(f_gen, f_ref)


def test_eval_equals_clean_fid_then_adds_only_new_shards(ray_cluster, s3, s3_server, bucket, tiny_net, tmp_path):
    shards = {"a": [picture(i, 32, "disc") for i in range(20)], "b": [picture(100 + i, 48, "disc") for i in range(14)]}
    refs = [picture(500 + i, 40, "square") for i in range(24)]
    put_sets(s3, bucket, tmp_path, shards, refs)
    cfg = validate(config(bucket, s3_server, tiny_net, seed=7))

    first = run_job(cfg, "eval")
    table = json.loads(s3.cat_file(f"{bucket}/out/eval/fid.json"))
    fid_peer, kid_peer = clean_fid_figures(tmp_path, tiny_net, seed=7)
    assert first["shards_done"] == 2 and table["count"] == 34 and table["reference_count"] == 24
    # the features differ from clean-fid's by the float32 rounding of the device resize alone (< 2e-4 on the
    # 0–255 scale, tests/unit/test_feature_net.py): the figures agree to well below any digit a paper prints
    assert table["fid"] == pytest.approx(fid_peer, rel=1e-4)
    assert table["kid"] == pytest.approx(kid_peer, rel=1e-3, abs=1e-7)
    assert first["fid"] == table["fid"] and table["fid"] > 0
    assert table["network"]["arch"] == "tiny-conv" and table["rank_deficient"] is False
    assert table["kid_subsets"] == 100 and table["kid_subset_size"] == 24
    s3.invalidate_cache()
    stats = s3.find(f"{bucket}/out/_eval/reference/stats/")
    assert len(stats) == 1  # the reference's statistics, computed once

    # a new shard after a scheduled translation: only it is measured, the reference is reused as stored
    shards["c"] = [picture(200 + i, 32, "disc") for i in range(6)]
    put_sets(s3, bucket, tmp_path, {"c": shards["c"]}, refs)
    stored = s3.cat_file(stats[0])
    second = run_job(cfg, "eval")
    assert second["shards_done"] == 1 and second["shards_skipped"] == 2 and second["evaluated"] == 40
    s3.invalidate_cache()
    assert s3.find(f"{bucket}/out/_eval/reference/stats/") == stats and s3.cat_file(stats[0]) == stored
    table = json.loads(s3.cat_file(f"{bucket}/out/eval/fid.json"))
    assert table["fid"] == pytest.approx(clean_fid_figures(tmp_path, tiny_net, seed=7)[0], rel=1e-4)

    # the reference changed: its statistics are measured again, under a new key
    s3.pipe(f"{bucket}/ref/r999.png", png(picture(999, 40, "square")))
    third = run_job(cfg, "eval")
    assert third["shards_done"] == 0 and third["reference_count"] == 25
    s3.invalidate_cache()
    assert len(s3.find(f"{bucket}/out/_eval/reference/stats/")) == 2


def test_a_set_against_itself_is_the_control(ray_cluster, s3, s3_server, bucket, tiny_net, tmp_path):
    """The judged images as their own reference: FID 0 (to sqrtm's precision) and KID at its floor (the
    unbiased estimator of two identical samples is slightly negative), both below the figures against
    another distribution; two tables in one output (``eval.name``), the features measured once."""
    images = [picture(i, 32, "disc") for i in range(20)]
    put_sets(s3, bucket, tmp_path, {"a": images}, images)
    for i in range(20):
        s3.pipe(f"{bucket}/squares/q{i:03d}.png", png(picture(300 + i, 32, "square")))
    s3.pipe(f"{bucket}/models/tiny.safetensors", open(tiny_net, "rb").read())  # the network from object storage
    net = f"s3://{bucket}/models/tiny.safetensors"
    opts = {"inception_storage_options": {"endpoint_url": s3_server}}
    same = run_job(validate(config(bucket, s3_server, net, name="control", **opts)), "eval")
    other = run_job(validate(config(bucket, s3_server, net, reference=f"s3://{bucket}/squares/", **opts)), "eval")
    assert other["shards_done"] == 0 and other["shards_skipped"] == 1  # the judged features are kept
    assert abs(same["fid"]) < 1e-6 < other["fid"]
    assert same["kid"] <= 0 < other["kid"]
    s3.invalidate_cache()
    assert s3.exists(f"{bucket}/out/eval/control.json") and s3.exists(f"{bucket}/out/eval/fid.json")


def refused(tmp_path, capsys, cfg: dict) -> str:
    path = tmp_path / f"cfg-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(json.dumps(cfg))
    code = main(["eval", "--config", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("latentshift:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line(ray_cluster, s3, s3_server, bucket, tiny_net, tmp_path, capsys):
    put_sets(s3, bucket, tmp_path, {"a": [picture(i, 32, "disc") for i in range(5)]}, [picture(9, 32, "square")])
    # no reference: refused, not a table without FID
    cfg = config(bucket, s3_server, tiny_net)
    cfg["eval"]["reference"] = None
    assert "eval.reference is not set" in refused(tmp_path, capsys, cfg)
    # a missing weights file: before anything runs
    line = refused(tmp_path, capsys, config(bucket, s3_server, tmp_path / "nope.safetensors"))
    assert "eval.inception" in line and "no such file" in line and "fid-export" in line
    # a reference of one image: no covariance
    line = refused(tmp_path, capsys, config(bucket, s3_server, tiny_net))
    assert "1 reference image(s)" in line and "at least 2" in line
    # an empty output: nothing committed to judge
    cfg = config(bucket, s3_server, tiny_net)
    cfg["eval"]["images"] = None
    line = refused(tmp_path, capsys, cfg)
    assert "no committed image shards" in line


def test_a_runs_own_output_quality_scores_and_a_shard_written_again(ray_cluster, s3, s3_server, bucket, tiny_net,
                                                                    tmp_path):
    """eval of a run's output (output.uri, no eval.images): its committed shards, the PSNR/SSIM its
    samples recorded, the CLIP means of scores/; a shard committed again after its features were measured
    (translate --overwrite) is measured again."""
    import time

    from pipeline.data.scores import score_row, scores_to_bytes

    def commit(name, images, at):
        records = [{"psnr": 20.0, "ssim": 0.5}, {"psnr": None, "ssim": 1.0}, {"job": "ood-sample"}]
        samples = [(f"{name}-{i}", {"png": png(im), "latentshift.json": json.dumps(records[i % 3]).encode(),
                                    "txt": b"carried"}) for i, im in enumerate(images)]
        s3.pipe(f"{bucket}/out/images/{name}.tar", tar_bytes(samples))
        s3.pipe(f"{bucket}/out/_ledger/{name}.json", json.dumps({"shard": name, "committed_at": at}).encode())

    commit("a", [picture(i, 32, "disc") for i in range(6)], 1000.0)
    commit("b", [picture(50 + i, 32, "disc") for i in range(6)], 1000.0)
    s3.pipe(f"{bucket}/out/scores/a.parquet", scores_to_bytes(
        [score_row(key=f"a-{i}", shard="a", clip_score=0.2 + 0.1 * i, directional=0.1) for i in range(3)]))
    put_sets(s3, bucket, tmp_path, {}, [picture(500 + i, 32, "square") for i in range(8)])
    cfg = config(bucket, s3_server, tiny_net)
    cfg["eval"]["images"] = None
    first = run_job(validate(cfg), "eval")
    assert first["shards_done"] == 2 and first["evaluated"] == 12 and first["rejected"] == first["dropped"] == 0
    table = json.loads(s3.cat_file(f"{bucket}/out/eval/fid.json"))
    assert table["quality_count"] == 8 and table["mean_psnr"] == pytest.approx((4 * 20 + 4 * 100) / 8)
    assert table["mean_ssim"] == pytest.approx(0.75, abs=1e-6)
    assert table["mean_clip_score"] == pytest.approx(0.3) and table["scored"] == 3
    assert table["mean_directional"] == pytest.approx(0.1)

    commit("b", [picture(80 + i, 32, "disc") for i in range(6)], time.time() + 60)
    second = run_job(validate(cfg), "eval")
    assert second["remeasured"] == ["b"] and second["shards_done"] == 1 and second["shards_skipped"] == 1
    assert json.loads(s3.cat_file(f"{bucket}/out/eval/fid.json"))["fid"] != table["fid"]
