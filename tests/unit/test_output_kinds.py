"""Output kinds (pipeline/data/output_kinds.py) and the run's metric sums (pipeline/data/run_metrics.py):
a new output is one class that the writer stages, the commit merges and a re-commit removes; the
sums go from rows to manifests to the summary with the means they always had."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.data.ledger as ledger_module
import pipeline.stages.write as write_module
from pipeline.data.ledger import ShardLedger
from pipeline.data.output_kinds import OUTPUT_KINDS, OutputKind, in_input_order
from pipeline.data.outputs import OutputStore
from pipeline.data.rows import (
    COLUMNS,
    MANIFEST_COLUMNS,
    OUTPUT_COLUMNS,
    LatentMeta,
    Provenance,
    RowBuffer,
    RowKind,
)
from pipeline.data.run_metrics import PSNR_OF_IDENTICAL, RunMetrics
from pipeline.stages.write import write_parts

PROVENANCE = Provenance(job="translate", config_hash="h", latentshift="0",
                        latents=LatentMeta(model="m", method="dpm", eta=0.0))


class Brightness(OutputKind):
    """A toy output: each output image's mean pixel value, one JSON line per sample, in input order."""

    name = "brightness"

    def path(self, store, shard):
        return store.path("brightness", f"{shard}.jsonl")

    def rows(self, batch, i, shard, settings):
        if int(batch["kind"][i]) != RowKind.SAMPLE:
            return []
        return [{"key": str(batch["key"][i]), "index": int(batch["index"][i]),
                 "mean": float(batch["pixels"][i].mean())}]

    def stage(self, records, settings, part):
        part.files["brightness"] = "".join(json.dumps(r) + "\n" for r in records).encode()

    def merge(self, shard):
        kept = {}
        for part in shard.parts:
            for line in (part.file("brightness") or b"").decode().splitlines():
                record = json.loads(line)
                if record["index"] in part.fresh:
                    kept[record["index"]] = line + "\n"
        if not kept:
            return None, {"bright": 0}
        return "".join(kept[i] for i in sorted(kept)).encode(), {"bright": len(kept)}


@pytest.fixture
def with_brightness(monkeypatch):
    """Brightness registered beside the four kinds, where the writer and the commit read the registry."""
    kinds = (*OUTPUT_KINDS, Brightness())
    monkeypatch.setattr(write_module, "OUTPUT_KINDS", kinds)
    monkeypatch.setattr(ledger_module, "OUTPUT_KINDS", kinds)


def model_batch(samples, rejects=(), latent_steps=0):
    """A model stage's output: SAMPLE rows (index, key, gray level), REJECT rows (index, key), and
    ``latent_steps`` LATENT rows per sample."""
    rows = RowBuffer(OUTPUT_COLUMNS)
    for index, key, level in samples:
        rows.add(shard="s", key=key, index=index, kind=RowKind.SAMPLE, latent_rows=latent_steps,
                 pixels=np.full((4, 4, 3), level, np.uint8), psnr=30.0, ssim=0.5)
        for step in range(latent_steps):
            rows.add(shard="s", key=key, index=index, kind=RowKind.LATENT, step=step,
                     latent=np.full((2, 2, 2), level, np.float16))
    for index, key in rejects:
        rows.add(shard="s", key=key, index=index, kind=RowKind.REJECT, error="cannot decode image: x")
    return rows.batch()


def commit(ledger, batches, rows, owns):
    assert ledger.begin("s")
    ledger.expect("s", rows)
    parts = [p for b in batches for p in write_parts(b, ledger, "png", PROVENANCE)["part"]]
    return ledger.commit("s", "in/s.tar", parts, "translate", "h", rows, {}, owns=owns)


def test_a_new_output_kind_is_one_class_staged_merged_and_removed_through_the_same_calls(tmp_path, with_brightness):
    store = OutputStore(str(tmp_path / "out"), {})
    owns = ("images", "rejects", "brightness")
    record = commit(ShardLedger(store, "run-1", redo_committed=True),
                    [model_batch([(2, "c", 30)]), model_batch([(0, "a", 10)], rejects=[(1, "b")]),
                     model_batch([(2, "c", 30)])],  # a retried task: index 2 is taken once
                    3, owns)
    assert record["bright"] == 2 and record["images"] == 2 and record["rejected"] == 1
    lines = [json.loads(line) for line in (tmp_path / "out" / "brightness" / "s.jsonl").read_text().splitlines()]
    assert [(r["key"], r["mean"]) for r in lines] == [("a", 10.0), ("c", 30.0)]  # input order

    # --overwrite, every sample rejected this time: the kind's file of the commit before goes
    record = commit(ShardLedger(store, "run-2", redo_committed=True), [model_batch([], rejects=[(0, "a"), (1, "b")])],
                    2, owns)
    assert record["bright"] == 0 and not (tmp_path / "out" / "brightness" / "s.jsonl").exists()


def test_the_registry_names_each_kind_once_and_the_store_paths_are_the_kinds_own(tmp_path):
    store = OutputStore(str(tmp_path), {}, control="_score")
    assert [k.name for k in OUTPUT_KINDS] == ["images", "latents", "scores", "features", "rejects"]
    for kind in OUTPUT_KINDS:
        assert getattr(store, kind.name)("s") == kind.path(store, "s")
    assert store.rejects("s").endswith("_score/_rejects/s.jsonl") and store.images("s").endswith("/images/s.tar")


def test_a_retried_part_whose_latents_earlier_parts_hold_commits_once(tmp_path):
    """The retry's latent rows are all taken already: its table keeps no row (and may not fail to)."""
    store = OutputStore(str(tmp_path), {})
    batch = model_batch([(0, "a", 1), (1, "b", 2)], latent_steps=2)
    record = commit(ShardLedger(store, "run-1"), [batch, batch], 2, ("images", "latents", "rejects"))
    assert record["images"] == 2 and record["latent_samples"] == 2
    table = pq.read_table(io.BytesIO(store.get(store.latents("s"))))
    assert list(zip(table["key"].to_pylist(), table["step"].to_pylist(), strict=True)) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1)]


def test_records_follow_input_order_then_their_second_column():
    import pyarrow as pa

    table = pa.table({"key": ["b", "x", "a", "b", "a"], "step": [1, 0, 2, 0, 1]})
    ordered = in_input_order(table, "step", {"a": 0, "b": 1})
    assert list(zip(ordered["key"].to_pylist(), ordered["step"].to_pylist(), strict=True)) == [
        ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("x", 0)]  # a key no sample names goes last


def _old_part_sums(batch, idx):
    """The writer's sums before RunMetrics (pipeline/stages/write.py at df1a222)."""
    psnr_sum = ssim_sum = clip_sum = directional_sum = 0.0
    metric_count = score_count = directional_count = 0
    for i in idx:
        psnr, ssim = float(batch["psnr"][i]), float(batch["ssim"][i])
        if not math.isnan(ssim):
            psnr_sum += psnr if math.isfinite(psnr) else PSNR_OF_IDENTICAL
            ssim_sum += ssim
            metric_count += 1
        clip, directional = float(batch["clip_score"][i]), float(batch["directional"][i])
        if not (math.isnan(clip) and math.isnan(directional)):
            if not math.isnan(clip):
                clip_sum += clip
                score_count += 1
            if not math.isnan(directional):
                directional_sum += directional
                directional_count += 1
    return {"psnr_sum": psnr_sum, "ssim_sum": ssim_sum, "metric_count": metric_count, "clip_score_sum": clip_sum,
            "directional_sum": directional_sum, "score_count": score_count, "directional_count": directional_count}


def _old_summary(t):
    """The envelope's means before RunMetrics (``_add_totals`` at df1a222)."""
    s = {}
    if t["metric_count"]:
        s["mean_psnr"] = round(t["psnr_sum"] / t["metric_count"], 3)
        s["mean_ssim"] = round(t["ssim_sum"] / t["metric_count"], 4)
    if t["score_count"]:
        s["scored"] = t["score_count"]
        s["mean_clip_score"] = round(t["clip_score_sum"] / t["score_count"], 4)
    if t["directional_count"]:
        s["mean_directional"] = round(t["directional_sum"] / t["directional_count"], 4)
    return s


def test_the_metric_sums_and_means_are_those_of_the_old_formulas():
    rng = np.random.default_rng(3)
    rows = RowBuffer(OUTPUT_COLUMNS)
    for j in range(40):
        rows.add(shard="s", key=f"k{j}", index=j, kind=RowKind.SAMPLE,
                 psnr=[math.inf, float(rng.uniform(10, 40)), math.nan][j % 3],
                 ssim=math.nan if j % 3 == 2 else float(rng.uniform()),
                 clip_score=math.nan if j % 4 == 0 else float(rng.uniform(-1, 1)),
                 directional=math.nan if j % 5 == 0 else float(rng.uniform(-1, 1)))
    batch = rows.batch()
    manifest = RowBuffer(MANIFEST_COLUMNS)
    old_totals = dict.fromkeys(_old_part_sums(batch, []), 0)
    for part in (range(0, 13), range(13, 40)):  # two parts, summed by the driver
        metrics = RunMetrics()
        for i in part:
            metrics.add(batch, i)
        assert metrics.as_columns() == _old_part_sums(batch, part)
        manifest.add(shard="s", kind=RowKind.SAMPLE, **metrics.as_columns())
        for k, v in _old_part_sums(batch, part).items():
            old_totals[k] += v
    sent = manifest.batch()
    totals = RunMetrics()
    for i in range(len(manifest)):
        totals.merge(RunMetrics.from_columns(sent, i))
    assert totals.as_columns() == old_totals
    assert totals.summary() == _old_summary(old_totals) and set(totals.summary()) == {
        "mean_psnr", "mean_ssim", "scored", "mean_clip_score", "mean_directional"}
    assert RunMetrics().summary() == {}  # nothing measured: no mean in the summary


def test_the_manifest_carries_every_sum_with_its_old_dtype():
    sums = list(RunMetrics().as_columns())
    assert sums == ["psnr_sum", "ssim_sum", "metric_count", "clip_score_sum", "directional_sum", "score_count",
                    "directional_count"]
    assert MANIFEST_COLUMNS[MANIFEST_COLUMNS.index("rejected") + 1:-1] == tuple(sums)
    assert {c: COLUMNS[c] for c in sums} == {
        "psnr_sum": ("float64", 0.0), "ssim_sum": ("float64", 0.0), "metric_count": ("int64", 0),
        "clip_score_sum": ("float64", 0.0), "directional_sum": ("float64", 0.0), "score_count": ("int64", 0),
        "directional_count": ("int64", 0)}
