"""eval: FID and KID of a run's images against a reference set, as clean-fid computes them in its default
clean mode (the official CycleDiffusion evaluation, evaluation/translate_to_dog.py:81-88), beside the
PSNR/SSIM to the inputs and the CLIP scores the run recorded: one table, ``eval/<name>.json``.

  units      the output's committed image shards (or ``eval.images``: shards, or a folder of image files)
  read → decode (as stored) → features (actor pool: uint8 to the device, clean resize there, the network)
             → ``_eval/features/<shard>.parquet``, committed by the ledger's rules under ``<output>/_eval/``:
             a re-run after a scheduled translation measures the new shards only
  reference  ``eval.reference``'s features, in a sub-run under ``_eval/reference/`` (the same stages, the
             images resized to ``eval.reference_size`` as the official evaluation resizes its dogs), only
             when no statistics of the same listing, resize and network exist; its statistics (count, mean
             and covariance in float64, the features KID draws from) are kept in
             ``_eval/reference/stats/<key>.safetensors`` and reused while the reference is unchanged
  finish     every committed feature file → FID (``frechet_distance``) and KID (``kid_subsets``: mean ± std)
             against the reference; means of PSNR/SSIM and of the CLIP scores in ``scores/``

The features of the judged images are all held by the driver at the finish (N × D float32: 400 MB for
50 000 Inception features), as clean-fid holds them; KID needs them whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import time

import numpy as np

from pipeline.errors import ConfigError, StorageError
from pipeline.runtime.job import Built, Job, SubRun, committed_image_shards, provenance

CONTROL = "_eval"
REFERENCE_FOLDER = f"{CONTROL}/reference"


# ---- what is judged, with what -------------------------------------------------------------------


def units(cfg):
    from pipeline.data.shards import list_image_units

    if cfg.eval.images:
        return list_image_units(cfg.eval.images, cfg.input.storage_options, cfg.eval.files_per_unit)
    return committed_image_shards(cfg)


def network(cfg) -> dict:
    """``eval.inception`` checked as the actors will load it (fetched once into the model cache when remote):
    its architecture, dimension and sha256, which every feature file and the reference key record."""
    from pipeline.data.model_cache import materialize_file
    from pipeline.metrics import feature_net

    if not (cfg.eval.inception or "").strip():
        raise ConfigError(f"config error: eval.inception is not set; give the feature network file ({feature_net.FIX})")
    try:
        path = materialize_file(cfg.eval.inception, cfg.eval.inception_storage_options)
    except StorageError as exc:
        reason = str(exc).removeprefix(f"{cfg.eval.inception}:").strip()  # the key's line names the file
        raise ConfigError(f"config error: eval.inception {cfg.eval.inception!r}: {reason}; {feature_net.FIX}") from None
    arch, config, _ = feature_net.describe(path, shown=cfg.eval.inception)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    import torch

    with torch.device("meta"):
        dims = int(feature_net.build(arch, config).dims)
    return {"file": cfg.eval.inception, "sha256": digest.hexdigest(), "arch": arch, "dims": dims}


def check(cfg) -> None:
    network(cfg)


def reference_key(cfg, net: dict) -> str:
    """What the reference statistics depend on: its listing, its resize, the network."""
    from pipeline.data.shards import listing_signature

    keys = {"listing": listing_signature(cfg.eval.reference, cfg.eval.reference_storage_options),
            "size": cfg.eval.reference_size, "filter": cfg.eval.reference_filter, "network": net["sha256"]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def stats_path(output_uri: str, key: str) -> str:
    return posixpath.join(output_uri.rstrip("/"), REFERENCE_FOLDER, "stats", f"{key}.safetensors")


def prepare(run) -> None:
    """The network (its features in this output must all be of one network), and the reference's key."""
    cfg, state = run.cfg, run.state
    state["network"] = net = network(cfg)
    record = run.store.ctl("network.json")
    if run.store.exists(record) and not run.options.get("overwrite"):
        earlier = run.store.get_json(record)
        if earlier.get("sha256") != net["sha256"]:
            raise ConfigError(f"config error: eval.inception {cfg.eval.inception!r} is not the network the features "
                              f"under {run.store.ctl('features')} were measured with ({earlier.get('file')!r}); "
                              "run with --overwrite to measure them all again, or give another output.uri")
    run.store.put_json(record, net)
    if cfg.eval.reference:
        state["reference_key"] = reference_key(cfg, net)
    state["remeasured"] = forget_stale(run)


def forget_stale(run) -> list[str]:
    """Shards whose images were committed again (``translate --overwrite``) after their features were
    measured: their eval records are removed, so this run measures them again. Returns their names."""
    from pipeline.data.outputs import OutputStore

    if run.cfg.eval.images:  # images of no ledger: a changed file is a new listing, measured by --overwrite
        return []
    images = OutputStore(run.cfg.output.uri, run.cfg.output.storage_options)
    stale = []
    for name in sorted(run.store.committed()):
        try:
            made = images.get_json(images.ledger(name)).get("committed_at", 0)
            measured = run.store.get_json(run.store.ledger(name)).get("committed_at", 0)
        except Exception:  # noqa: BLE001 - a record gone meanwhile: nothing to compare, leave it
            continue
        if made > measured:
            run.store.remove(run.store.ledger(name))
            stale.append(name)
    return stale


# ---- the rows ------------------------------------------------------------------------------------


def _build(run, shards, size: int | None):
    import ray.data

    from pipeline.runtime.ray_env import model_stage
    from pipeline.stages.features import FeatureStage
    from pipeline.stages.images import decode_for_features
    from pipeline.stages.read import read_image_files, read_shard

    cfg = run.cfg
    options = cfg.input.storage_options if cfg.eval.images else cfg.output.storage_options
    tars = [s for s in shards if not s.files]
    files = [s for s in shards if s.files]
    parts = []
    if tars:
        parts.append(ray.data.from_items([{"uri": s.uri, "name": s.name} for s in tars], override_num_blocks=len(tars))
                     .flat_map(read_shard, fn_kwargs={"storage_options": options, "ledger": run.ledger,
                                                      "carry": None}))
    if files:
        parts.append(ray.data.from_items([{"uri": s.uri, "name": s.name, "files": list(s.files)} for s in files],
                                         override_num_blocks=len(files))
                     .flat_map(read_image_files, fn_kwargs={"storage_options": options, "ledger": run.ledger}))
    ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    ds = ds.map_batches(decode_for_features, batch_format="numpy", batch_size=cfg.runtime.batch_size,
                        fn_kwargs={"size": size, "resize": "center_crop", "max_pixels": cfg.image.max_pixels,
                                   "exif_transpose": cfg.image.exif_transpose, "filter": cfg.eval.reference_filter})
    ds = model_stage(ds, cfg.runtime, FeatureStage, eval=cfg.eval)
    settings = {"network": run.state["network"], "resize": "clean (PIL bicubic, float, 299×299)",
                "image_size": size, "filter": cfg.eval.reference_filter if size else None}
    return Built(ds, provenance(run, settings))


def build(run, shards):
    return _build(run, shards, None)  # the judged images as they were written


def build_reference(run, shards):
    return _build(run, shards, run.cfg.eval.reference_size)


# ---- the finish ----------------------------------------------------------------------------------


def gather(run) -> dict:
    """Every committed feature file of this run's units: features (n, D), psnr, ssim; and the units
    not (yet) measured. Files of another network are refused."""
    from pipeline.data.features import features_from_bytes

    store, net = run.store, run.state["network"]
    committed = store.committed()
    feats, psnr, ssim, missing = [], [], [], []
    for unit in units(run.cfg):
        path = store.ctl("features", f"{unit.name}.parquet")
        if unit.name not in committed:
            missing.append(unit.name)
            continue
        if not store.exists(path):  # committed with no feature: every image of the shard was rejected
            continue
        table = features_from_bytes(store.get(path))
        if table["meta"].get("network", {}).get("sha256") != net["sha256"]:
            raise StorageError(f"{path}: measured with another feature network than eval.inception; "
                               "run with --overwrite to measure every shard again")
        feats.append(table["features"])
        psnr.append(table["psnr"])
        ssim.append(table["ssim"])
    d = net["dims"]
    return {"features": np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
            "psnr": np.concatenate(psnr) if psnr else np.zeros(0, np.float32),
            "ssim": np.concatenate(ssim) if ssim else np.zeros(0, np.float32), "missing": missing}


def statistics(features: np.ndarray) -> dict:
    from pipeline.metrics.fid import gaussian_statistics

    mu, sigma = gaussian_statistics(features)
    return {"count": len(features), "mu": mu, "sigma": sigma, "features": features}


def finish_reference(run) -> None:
    """The reference's statistics, kept under the parent's output for the runs after this one."""
    from pipeline.data.stats import write_tensor_file

    cfg = run.cfg
    got = gather(run)
    if len(got["features"]) < 2:
        raise StorageError(f"{cfg.eval.images}: {len(got['features'])} reference image(s) could be measured "
                           f"({run.summary.get('rejected', 0)} rejected, see {run.store.ctl('_rejects')}); FID needs "
                           "at least 2 (a covariance), and thousands to mean what the papers' figures mean")
    stats = statistics(got["features"])
    key = run.state["reference_key"]
    header = {"count": stats["count"], "key": key, "reference": cfg.eval.images, "network": run.state["network"],
              "size": cfg.eval.reference_size, "filter": cfg.eval.reference_filter, "created_at": time.time()}
    target = posixpath.join(cfg.output.uri.rstrip("/"), "stats", f"{key}.safetensors")
    write_tensor_file(target, cfg.output.storage_options, {"mu": stats["mu"], "sigma": stats["sigma"],
                                                     "features": stats["features"]}, header)
    run.state["stats"] = stats
    run.summary.update(reference_count=stats["count"], reference_stats=target)


def reference_config(run, cfg):
    """The reference's sub-run, unless its statistics of this key are already stored."""
    from pipeline.data.filesystems import url_to_fs

    key = run.state.get("reference_key")
    if key is None:
        return None
    fs, path = url_to_fs(stats_path(run.cfg.output.uri, key), run.cfg.output.storage_options)
    if fs.exists(path):
        return None
    cfg.eval.images, cfg.eval.reference = run.cfg.eval.reference, None
    cfg.input.storage_options = run.cfg.eval.reference_storage_options
    return cfg


def hand_over(parent, reference) -> None:
    parent.state["reference_stats"] = reference.state["stats"]


def reference_prepare(run) -> None:
    run.state["network"] = network(run.cfg)
    run.state["reference_key"] = reference_key(_as_parent(run.cfg), run.state["network"])


def _as_parent(cfg):
    """The reference sub-run's config read as its parent's: ``eval.reference`` is what it reads."""
    parent = cfg.model_copy(deep=True)
    parent.eval.reference, parent.eval.reference_storage_options = cfg.eval.images, cfg.input.storage_options
    return parent


def load_reference(run) -> dict:
    from pipeline.data.stats import read_tensor_file

    if "reference_stats" in run.state:
        return run.state["reference_stats"]
    uri = stats_path(run.cfg.output.uri, run.state["reference_key"])
    tensors, header = read_tensor_file(uri, run.cfg.output.storage_options, ("mu", "sigma", "features"),
                                       "reference statistics file", "remove it: the next eval measures the reference again")
    return {"count": int(header["count"]), "mu": np.asarray(tensors["mu"], np.float64),
            "sigma": np.asarray(tensors["sigma"], np.float64), "features": np.asarray(tensors["features"], np.float32),
            "cached": uri}


def finish(run) -> None:
    from pipeline.metrics.fid import frechet_distance, kid_subsets

    cfg, s, net = run.cfg, run.summary, run.state["network"]
    got = gather(run)
    judged = cfg.eval.images or posixpath.join(cfg.output.uri.rstrip("/"), "images/")
    n = len(got["features"])
    if n < 2:
        raise StorageError(f"{judged}: {n} image(s) measured ({s.get('rejected', 0)} rejected, see "
                           f"{run.store.ctl('_rejects')}); FID and KID need at least 2")
    result = {"name": cfg.eval.name, "images": judged, "count": n, "network": net,
              "resize": "clean: PIL bicubic per channel in float to 299×299 (clean-fid's clean mode)",
              "missing_shards": got["missing"], "run_id": run.run_id, "created_at": time.time()}
    if cfg.eval.reference:
        ref = load_reference(run)
        mine = statistics(got["features"])
        values = kid_subsets(mine["features"].astype(np.float64), ref["features"].astype(np.float64),
                             cfg.eval.kid_subsets, cfg.eval.kid_subset_size, rng=np.random.RandomState(cfg.eval.seed))
        result.update(
            reference=cfg.eval.reference, reference_count=ref["count"], reference_size=cfg.eval.reference_size,
            reference_filter=cfg.eval.reference_filter if cfg.eval.reference_size else None,
            reference_stats=ref.get("cached") or stats_path(cfg.output.uri, run.state["reference_key"]),
            fid=frechet_distance(mine["mu"], mine["sigma"], ref["mu"], ref["sigma"]),
            kid=float(values.mean()), kid_std=float(values.std()), kid_subsets=cfg.eval.kid_subsets,
            kid_subset_size=min(n, ref["count"], cfg.eval.kid_subset_size), kid_seed=cfg.eval.seed,
            rank_deficient=min(n, ref["count"]) <= net["dims"])
    result.update(quality(got), **clip_means(run))
    target = run.store.path("eval", f"{cfg.eval.name}.json")
    run.store.put_json(target, result)
    s.update({k: result[k] for k in ("fid", "kid", "kid_std", "reference_count", "rank_deficient", "mean_psnr",
                                     "mean_ssim", "mean_clip_score", "mean_directional", "scored") if k in result},
             evaluated=n, eval_json=target, eval_missing=got["missing"], remeasured=run.state.get("remeasured", []))


def quality(got: dict) -> dict:
    """Mean PSNR/SSIM over the judged images that recorded them (identical images count 100 dB, as the run's
    own summary counts them: pipeline/data/run_metrics.py)."""
    from pipeline.data.run_metrics import PSNR_OF_IDENTICAL

    have = ~np.isnan(got["ssim"])
    if not have.any():
        return {}
    psnr = np.where(np.isinf(got["psnr"][have]), PSNR_OF_IDENTICAL, got["psnr"][have]).astype(np.float64)
    return {"mean_psnr": round(float(psnr.mean()), 3), "mean_ssim": round(float(got["ssim"][have].mean()), 4),
            "quality_count": int(have.sum())}


def clip_means(run) -> dict:
    """Mean CLIP score and directional CLIP over ``scores/`` (rank 0: the output image), where it exists."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if run.cfg.eval.images:
        return {}
    files = [p for p in run.store.find(run.store.path("scores")) if p.endswith(".parquet")]
    clip, directional = [], []
    for p in files:
        table = pq.read_table(io.BytesIO(run.store.get(p)), columns=["rank", "clip_score", "directional"])
        first = table.filter(pc.equal(table["rank"], 0))
        clip += [v for v in first["clip_score"].to_pylist() if v is not None and not math.isnan(v)]
        directional += [v for v in first["directional"].to_pylist() if v is not None and not math.isnan(v)]
    out = {}
    if clip:
        out.update(mean_clip_score=round(float(np.mean(clip)), 4), scored=len(clip))
    if directional:
        out["mean_directional"] = round(float(np.mean(directional)), 4)
    return out


def summary_lines(s: dict) -> list[str]:
    if "eval_json" not in s:
        return []
    lines = []
    if "fid" in s:
        note = " (fewer images than feature dimensions: the covariance is rank-deficient)" if s["rank_deficient"] else ""
        lines.append(f"  FID        {s['fid']:.4f}   KID {s['kid']:.6f} ± {s['kid_std']:.6f}   "
                     f"{s['evaluated']} images vs {s['reference_count']} reference{note}")
    if s.get("remeasured"):
        lines.append(f"  remeasured {len(s['remeasured'])} shard(s) whose images were written again since")
    if s.get("eval_missing"):
        lines.append(f"  NOT YET    {len(s['eval_missing'])} shard(s) without features ({', '.join(s['eval_missing'][:5])}"
                     f"{' …' if len(s['eval_missing']) > 5 else ''}): re-run to measure them")
    lines.append(f"  table      {s['eval_json']}")
    return lines


REFERENCE = Job(
    name="eval-reference",
    command=("eval",),
    help="the reference set's features and statistics (a sub-run of eval)",
    requires=("eval.images",),
    units=units,
    build=build_reference,
    commits=("features", "rejects"),
    check=check,
    prepare=reference_prepare,
    finish=finish_reference,
    control=CONTROL,
)

JOB = Job(
    name="eval",
    command=("eval",),
    help="FID and KID of output.uri's images against eval.reference (clean-fid's clean mode), with PSNR/SSIM "
         "and CLIP means: eval/<name>.json",
    requires=("output.uri", "eval.reference", "eval.inception"),
    units=units,
    build=build,
    commits=("features", "rejects"),
    summary=summary_lines,
    check=check,
    prepare=prepare,
    finish=finish,
    control=CONTROL,
    subruns=(SubRun(REFERENCE_FOLDER, reference_config, hand_over, job=REFERENCE),),
)
