"""CLIP scores (pipeline/metrics/scorer.py) on a tiny random open_clip, with no network: the formulas
against a direct computation, the texts and their errors, the score job's pair reader, and the
scores Parquet read back with plain pyarrow."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from shard_builders import png, rgb_image, tar_bytes

from pipeline.config import ClipConfig, ModelConfig, ScoreConfig, validate
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.data.rows import SCORE_PIXEL_COLUMNS, Provenance, RowBuffer, RowKind
from pipeline.data.scores import SCORE_SCHEMA
from pipeline.errors import ConfigError
from pipeline.jobs.checks import check_scoring
from pipeline.metrics.clip import IMAGENET_TEMPLATES
from pipeline.metrics.scorer import score_texts
from pipeline.stages.base import load_scorer
from pipeline.stages.images import decode_pairs
from pipeline.stages.read import read_pairs
from pipeline.stages.score import ScoreStage
from pipeline.tools.random_clip import save_random_clip

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_network")]



@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip_cfg(clip_files):
    config, weights = clip_files
    return ClipConfig(model=config, pretrained=weights)


@pytest.fixture(scope="module")
def scorer(clip_cfg):
    return load_scorer(clip_cfg, ScoreConfig(source_text="a photo of a cat", target_text="a photo of a dog"),
                       ModelConfig(), ModelConfig(), device="cpu")


def _uint8(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _by_hand(clip, images_u8: np.ndarray) -> torch.Tensor:
    """Normalised image features computed directly: at the model's own 32 px no resize happens, so
    CLIP's preprocessing is [0, 1] then (x − mean) / std with OpenAI's constants."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = clip.model.encode_image(x).float()
    return f / f.norm(dim=-1, keepdim=True)


def _text_by_hand(clip, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        f = clip.model.encode_text(clip.tokenizer(texts)).float()
    return f / f.norm(dim=-1, keepdim=True)


def test_scores_against_a_direct_computation(scorer):
    """clean_clip.py:19-41: clip = E(out)·T(target); directional = normalise(E(out) − E(in)) ·
    normalise(T(target) − T(source)), with every feature L2-normalised."""
    clip = scorer.clip
    out, inp = _uint8(5, seed=1), _uint8(5, seed=2)
    got_clip, got_dir = scorer.score(out, inp)
    assert got_clip.shape == (5,) and got_dir.shape == (5,)
    assert got_clip.dtype == np.float32 and got_dir.dtype == np.float32

    e_out, e_in = _by_hand(clip, out), _by_hand(clip, inp)
    t_src, t_trg = _text_by_hand(clip, ["a photo of a cat", "a photo of a dog"])
    want_clip = torch.einsum("bz,z->b", e_out, t_trg)
    d_img = e_out - e_in
    d_img = d_img / d_img.norm(dim=-1, keepdim=True)
    d_txt = (t_trg - t_src) / (t_trg - t_src).norm()
    want_dir = torch.einsum("bz,z->b", d_img, d_txt)
    np.testing.assert_allclose(got_clip, want_clip.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_dir, want_dir.numpy(), atol=1e-5)
    assert np.abs(got_dir).max() > 1e-3  # random images and texts: the test compares real numbers, not zeros


def test_uint8_and_float_inputs_agree_and_samples_do_not_mix(scorer):
    out, inp = _uint8(4, size=24, seed=3), _uint8(4, size=24, seed=4)  # 24 px: CLIP's resize runs
    a = scorer.score(out, inp)
    as_float = lambda u: torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    b = scorer.score(as_float(out), as_float(inp))
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    one = [scorer.score(out[i:i + 1], inp[i:i + 1]) for i in range(4)]  # a sample's score is its own
    np.testing.assert_allclose(a[0], np.concatenate([c for c, _ in one]), atol=1e-5)
    np.testing.assert_allclose(a[1], np.concatenate([d for _, d in one]), atol=1e-5)


def test_directional_is_nan_without_inputs_or_a_source_text(scorer, clip_cfg):
    clip_only, directional = scorer.score(_uint8(3))
    assert np.isfinite(clip_only).all() and np.isnan(directional).all()
    no_source = load_scorer(clip_cfg, ScoreConfig(target_text="a photo of a dog"), ModelConfig(), ModelConfig(),
                            device="cpu", directional=False)
    c, d = no_source.score(_uint8(3), _uint8(3, seed=9))
    np.testing.assert_allclose(c, clip_only, atol=1e-6)
    assert np.isnan(d).all()


def test_templates_average_the_imagenet_prompts(scorer, clip_cfg):
    """score.templates: T is the mean of the normalised per-template features (Asyrp clip_loss.py:110-117)."""
    templated = load_scorer(clip_cfg, ScoreConfig(source_text="cat", target_text="dog", templates=True),
                            ModelConfig(), ModelConfig(), device="cpu")
    clip = templated.clip
    mean = _text_by_hand(clip, [t.format("dog") for t in IMAGENET_TEMPLATES]).mean(0)
    torch.testing.assert_close(templated.target[0], mean, atol=1e-6, rtol=0)
    out, inp = _uint8(3, seed=5), _uint8(3, seed=6)
    e_out = _by_hand(clip, out)
    want = (e_out @ mean) / mean.norm()
    got, _ = templated.score(out, inp)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    plain = load_scorer(clip_cfg, ScoreConfig(source_text="cat", target_text="dog"), ModelConfig(), ModelConfig(),
                        device="cpu")
    assert not np.allclose(plain.score(out)[0], got, atol=1e-4)  # the templates change the text


def test_texts_fall_back_to_prompt_conditions_and_name_the_missing_key():
    prompt = lambda c: ModelConfig(model="m", condition=c)  # noqa: E731
    assert score_texts(ScoreConfig(source_text="a cat", target_text="a dog"), prompt("x"), prompt("y")) == (
        "a cat", "a dog")  # the score section wins
    assert score_texts(ScoreConfig(), prompt("a horse"), prompt("a zebra")) == ("a horse", "a zebra")
    with pytest.raises(ConfigError, match=r"score\.target_text"):  # a class index is no text
        score_texts(ScoreConfig(source_text="a cat"), prompt("a cat"), prompt(3))
    with pytest.raises(ConfigError, match=r"score\.target_text"):  # blank counts as unset
        score_texts(ScoreConfig(target_text="  "), prompt("a cat"), prompt(None))
    with pytest.raises(ConfigError, match=r"score\.source_text"):
        score_texts(ScoreConfig(target_text="a dog"), prompt(None), prompt(None))
    assert score_texts(ScoreConfig(target_text="a dog"), prompt(None), prompt(None), directional=False) == (
        None, "a dog")


def test_preflight_names_the_clip_key_before_any_model(tmp_path):
    texts = ScoreConfig(source_text="a cat", target_text="a dog")
    with pytest.raises(ConfigError, match=r"clip\.pretrained is not set"):
        check_scoring(ClipConfig(), texts, ModelConfig(), ModelConfig())
    with pytest.raises(ConfigError, match=r"clip\.pretrained .*nope\.safetensors.*no such file"):
        check_scoring(ClipConfig(pretrained=str(tmp_path / "nope.safetensors")), texts, ModelConfig(), ModelConfig())

    from pipeline.jobs import get

    translate = get("translate")
    cfg = validate({"input": {"uri": "x"}, "output": {"uri": "y"}, "source": {"model": "a"},
                    "target": {"model": "b"}})
    translate.check(cfg)  # no inline scoring: nothing to check
    with pytest.raises(ConfigError, match=r"clip\.pretrained"):
        translate.check(cfg.model_copy(update={"score": texts.model_copy(update={"inline": True})}))
    score = get("score")
    assert score.control == "_score" and score.commits == ("scores", "rejects")
    with pytest.raises(ConfigError, match=r"clip\.pretrained"):
        cfg.require(*score.requires)


def _sample(key: str, seed: int, size: int = 16) -> tuple[str, dict[str, bytes]]:
    return key, {"png": png(rgb_image(seed, size)), "latentshift.json": json.dumps({"key": key}).encode()}


def test_read_pairs_pairs_by_key_and_rejects_a_missing_input(tmp_path):
    out_uri, in_uri = tmp_path / "out-shard-a.tar", tmp_path / "in-shard-a.tar"
    out_uri.write_bytes(tar_bytes([_sample("k0", 0), _sample("k1", 1), _sample("k2", 2)]))
    inputs = [_sample("k2", 12, size=20), _sample("k0", 10, size=20)]  # another order, another size; no k1
    in_uri.write_bytes(tar_bytes(inputs))
    ledger = ShardLedger(OutputStore(str(tmp_path / "o"), {}, "_score"), "run-1")

    rows = read_pairs({"name": "shard-a", "uri": str(out_uri)}, {}, {"shard-a": str(in_uri)}, {}, ledger)
    assert [(r["key"], int(r["kind"])) for r in rows] == [("k0", RowKind.SAMPLE), ("k1", RowKind.REJECT),
                                                         ("k2", RowKind.SAMPLE)]
    assert [int(r["index"]) for r in rows] == [0, 1, 2]
    assert "'k1'" in rows[1]["error"] and "'shard-a'" in rows[1]["error"] and "input image missing" in rows[1]["error"]
    assert rows[0]["input_image"] == dict(inputs)["k0"]["png"] and rows[2]["input_image"] == dict(inputs)["k2"]["png"]
    assert ledger.expected_rows("shard-a") == 3 and ledger.store.exists(ledger.store.claims("shard-a"))
    ledger.finish(["shard-a"])

    # no input shard of that basename: every sample is a reject naming it; without input.uri none is
    lone = read_pairs({"name": "shard-a", "uri": str(out_uri)}, {}, {}, {}, ledger)
    assert all(int(r["kind"]) == RowKind.REJECT and "no input shard shard-a.tar" in r["error"] for r in lone)
    ledger.finish(["shard-a"])
    alone = read_pairs({"name": "shard-a", "uri": str(out_uri)}, {}, None, {}, ledger)
    assert [int(r["kind"]) for r in alone] == [RowKind.SAMPLE] * 3 and all(r["input_image"] == b"" for r in alone)

    # decode: both images to image.size (as translate decoded its input); an undecodable one rejects the pair
    batch = {c: np.array([r[c] for r in rows] + [rows[0][c]], dtype=object) for c in rows[0]}
    batch["kind"] = np.array([r["kind"] for r in rows] + [RowKind.SAMPLE], dtype=np.int8)
    batch["input_image"][3] = b"\x89PNG broken"
    pixels = decode_pairs(batch, size=16, resize="center_crop", max_pixels=10**6)
    assert set(pixels) == set(SCORE_PIXEL_COLUMNS)
    assert pixels["pixels"][0].shape == pixels["input_pixels"][0].shape == (16, 16, 3)
    assert int(pixels["kind"][1]) == RowKind.REJECT and pixels["error"][1] == rows[1]["error"]
    assert int(pixels["kind"][3]) == RowKind.REJECT and pixels["error"][3].startswith("input image of key 'k0'")


def test_score_rows_commit_as_a_scores_parquet_and_no_image(tmp_path, clip_cfg):
    stage = ScoreStage(clip_cfg, ScoreConfig(source_text="a cat", target_text="a dog"), ModelConfig(), ModelConfig())
    rows = RowBuffer(SCORE_PIXEL_COLUMNS)
    out, inp = _uint8(3, 16, seed=7), _uint8(3, 16, seed=8)
    rows.add(shard="shard-a", key="k0", index=0, kind=RowKind.SAMPLE, pixels=out[0], input_pixels=inp[0])
    rows.add(shard="shard-a", key="k1", index=1, kind=RowKind.REJECT, error="input image missing: key 'k1'")
    rows.add(shard="shard-a", key="k2", index=2, kind=RowKind.SAMPLE, pixels=out[1], input_pixels=inp[1])
    rows.add(shard="shard-a", key="k3", index=3, kind=RowKind.SAMPLE, pixels=out[2], input_pixels=inp[2])
    emitted = stage(rows.batch())
    scored = emitted["kind"] == RowKind.SAMPLE
    assert list(emitted["key"][scored]) == ["k0", "k2", "k3"]
    want_clip, want_dir = stage.scorer.score(out, inp)
    np.testing.assert_allclose(emitted["clip_score"][scored], want_clip, atol=1e-6)
    assert all(p.size == 0 for p in emitted["pixels"])  # nothing for the writer to make an image of

    from pipeline.stages.write import write_parts

    store = OutputStore(str(tmp_path), {}, "_score")
    ledger = ShardLedger(store, "run-1")
    assert ledger.begin("shard-a")
    ledger.expect("shard-a", 4)
    manifest = write_parts(emitted, ledger, "png", Provenance(job="score", config_hash="h", latentshift="0"))
    assert int(manifest["rows"][0]) == 4 and int(manifest["images"][0]) == 0 and int(manifest["score_count"][0]) == 3
    record = ledger.commit("shard-a", "images/shard-a.tar", list(manifest["part"]), "score", "h", 4, {})
    assert record["images"] == 0 and record["rejected"] == 1 and record["scored"] == 3

    table = pq.read_table(tmp_path / "scores" / "shard-a.parquet")  # plain pyarrow, no Ray, no torch
    assert table.schema.equals(SCORE_SCHEMA)
    assert table.column("key").to_pylist() == ["k0", "k2", "k3"] and set(table.column("rank").to_pylist()) == {0}
    assert table.column("clip_score").type == pa.float32()
    np.testing.assert_allclose(table.column("clip_score").to_numpy(), want_clip, atol=1e-6)
    np.testing.assert_allclose(table.column("directional").to_numpy(), want_dir, atol=1e-6)
    assert all(v is None for v in table.column("trial").to_pylist())  # search columns: null here
    assert not (tmp_path / "images").exists() and not (tmp_path / "_ledger").exists()  # the score job's ledger:
    assert (tmp_path / "_score" / "_ledger" / "shard-a.json").is_file()  # under _score/, apart from translate's
    reject = json.loads((tmp_path / "_score" / "_rejects" / "shard-a.jsonl").read_text())
    assert reject["key"] == "k1" and "input image missing" in reject["reason"]
    assert not math.isnan(float(table.column("directional")[0].as_py()))


def test_a_score_parquet_reads_without_the_pipeline(tmp_path):
    """The documented columns, written by the pipeline's helper, read back by pyarrow alone."""
    from pipeline.data.scores import score_row, scores_to_bytes

    (tmp_path / "s.parquet").write_bytes(scores_to_bytes([score_row(key="a", shard="s", clip_score=0.25,
                                                                    directional=-0.5)]))
    row = pq.read_table(io.BytesIO((tmp_path / "s.parquet").read_bytes())).to_pylist()[0]
    assert row == {"key": "a", "shard": "s", "rank": 0, "candidate": -1, "clip_score": 0.25, "directional": -0.5,
                   "trial": None, "skip": None, "strength": None, "encoder_scale": None, "decoder_scale": None}


def test_a_score_parquet_says_what_it_was_measured_with():
    """The run's settings ride in the schema metadata, as JSON under b"latentshift"; a file without
    them reads as {}."""
    from pipeline.data.scores import score_metadata, score_row, scores_to_bytes

    meta = {"job": "score", "settings": {"clip_model": "ViT-B-32", "source_text": "a cat", "target_text": "a dog"}}
    table = pq.read_table(io.BytesIO(scores_to_bytes([score_row(key="a", shard="s")], meta)))
    assert json.loads(table.schema.metadata[b"latentshift"]) == meta  # plain pyarrow sees it
    assert score_metadata(table) == meta
    assert score_metadata(pq.read_table(io.BytesIO(scores_to_bytes([score_row(key="a", shard="s")])))) == {}
