"""``latentshift demo``: the whole pipeline on the bundled shape models, with numbers.

1. generate 256 discs, and 64 triangles for each OOD domain of ``OOD_DOMAINS`` (aligned: the
   paper's setting; unaligned: the documented limit), as shards (DIR/inputs/…)
2. translate the discs with the discs model → squares model (CycleDiffusion; DIR/translated), and judge
   it with `eval`: FID/KID against 256 real squares (DIR/inputs/squares) and against the discs (the
   control), with 8 edge-orientation features standing in for Inception (DIR/translated/eval/)
3. per OOD domain: fit OOD statistics of the triangles through the discs model
   (DIR/unseen/<domain>/fit) and synthesize 64 images with every mode of ``SAMPLING_MODES``
   (DIR/unseen/<domain>/<mode>)
4. h-space editing (Asyrp) through the discs model: a mean-difference direction from small to large
   centred discs (``EDIT_SETS``, DIR/inputs/edit-*; `direction fit` → DIR/edit/direction.safetensors),
   then `edit` of held-out small discs at each of configs/demo/edit.yaml's scales (DIR/edit/edited)
5. guidance in latent space (CycleDiffusion) through the discs model: `guide` with the offline hue
   energy (configs/demo/guide.yaml), unguided (0 Langevin steps) and guided on the same seeds
   (DIR/guide/unguided, DIR/guide/guided)
6. measure: plain discs-model samples, an invert→decode reconstruction gate per fit, triangle
   rate and novelty (nearest-input distance) per mode, the edits' size, kind, position and hue
   per scale, the guided images' hue error to the target and disc rate against the unguided ones;
   DIR/report.png (contact sheet), DIR/report.json, and a table on stdout

The parts live in their own modules (``translation``, ``unseen``, ``edit``, ``guide``; shared
helpers in ``common``); this one runs them in order and writes the report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.demo.common import (
    TARGETS,
    contact_sheet,
    demo_config_dir,
    fmt,
    label_counts,
    plain_samples,
    read_images,
)
from pipeline.demo.edit import EDIT_SETS, edit_lines, hspace_edit, measure_edit
from pipeline.demo.guide import guide_lines, guide_runs, measure_guide
from pipeline.demo.translation import (
    edge_network,
    fid_lines,
    judge_translation,
    translation_metrics,
)
from pipeline.demo.unseen import (
    MAIN_DOMAIN,
    OOD_DOMAINS,
    SAMPLING_MODES,
    domain_lines,
    input_folder,
    measure_domain,
    synthesize,
)


def run_demo(out_dir: str | Path, discs: int = 128, triangles: int = 64, unseen: int = 64,
             models: dict | None = None, steps: int | None = None, s3_endpoint: str | None = None,
             domains: list[str] | None = None, edit_examples: int = 48, edits: int = 16, guides: int = 8,
             plain_count: int = 32, out=sys.stdout) -> dict:
    """The demo into ``out_dir``; ``domains`` picks OOD rows of ``OOD_DOMAINS`` (default: all);
    ``edit_examples`` discs in each of the edit part's sets A and B, ``edits`` held-out ones edited
    (0: no edit part); ``guides`` seeds of the guide part, each unguided and guided (0: no guide part);
    ``plain_count`` unconditional discs-model samples (what the model makes without an OOD fit).

    The counts are cut toward a two-minute demo on a 2-core CPU (docs/demo.md, "Where the time goes");
    every figure the report checks is a rate over them, and each was also measured at larger counts."""
    from pipeline.config import load_config
    from pipeline.demo.common import run_quietly
    from pipeline.demo.shapes import write_shapes
    from pipeline.metrics.shapes import measure_shapes, shape_rate
    from pipeline.runtime.ray_env import init_ray

    started = time.time()
    domains = list(domains or OOD_DOMAINS)
    unknown = [d for d in domains if d not in OOD_DOMAINS]
    if unknown:
        raise ValueError(f"unknown OOD domain(s) {unknown}; known: {', '.join(OOD_DOMAINS)}")
    out_dir = Path(out_dir).resolve()
    models = {"discs": "bundled:discs", "squares": "bundled:squares", **(models or {})}
    cfg_dir = demo_config_dir()
    if s3_endpoint:
        base, opts = "s3://latentshift-demo", {"endpoint_url": s3_endpoint}
    else:
        base, opts = str(out_dir), {}
    so = [f"input.storage_options={json.dumps(opts)}", f"output.storage_options={json.dumps(opts)}"]
    common = [*so, *([f"sampler.steps={steps}"] if steps else [])]

    def step(msg):
        out.write(f"[demo {time.time() - started:6.1f}s] {msg}\n")
        out.flush()

    init_ray()
    step(f"1/6 generating {discs} discs and {triangles} triangles per OOD domain ({', '.join(domains)})")
    write_shapes("discs", discs, f"{base}/inputs/discs", seed=0, per_shard=64, storage_options=opts)
    for domain in domains:
        write_shapes("triangles", triangles, f"{base}/inputs/{input_folder(domain)}", seed=1, per_shard=64,
                     storage_options=opts, aligned=OOD_DOMAINS[domain][1])

    step("2/6 translating discs → squares (discs model encodes, squares model decodes)")
    tcfg = load_config(cfg_dir / "translate.yaml", [f"input.uri={base}/inputs/discs", f"output.uri={base}/translated",
                                                     f"source.model={models['discs']}", f"target.model={models['squares']}",
                                                     *common])
    t_summary = run_quietly(tcfg, "translate", overwrite=True, out=out)
    step("2/6 judging the translation: FID and KID against real squares, and against the discs (control)")
    net = edge_network(out_dir / "fid-edges.safetensors")
    fid_row = judge_translation(base, opts, net, discs, {"batch_size": tcfg.runtime.batch_size}, out)

    ood_overrides = [f"source.model={models['discs']}", f"ood.count={unseen}", f"ood.shard_size={unseen}", *so,
                     *([f"ood.inversion_steps={steps}"] if steps else [])]
    jobs = {}
    for domain in domains:
        step(f"3/6 unseen-domain synthesis, {OOD_DOMAINS[domain][0]}: fit through the discs model, sample "
             f"{len(SAMPLING_MODES)} modes ({'; '.join(n for n, _ in SAMPLING_MODES)})")
        jobs[domain] = synthesize(domain, base, cfg_dir, ood_overrides, out)

    edit_jobs = None
    if edits:
        a, b = EDIT_SETS
        step(f"4/6 h-space edit (Asyrp) through the discs model: direction {a} → {b} centred discs from "
             f"{edit_examples} + {edit_examples} examples, edit {edits} held-out {a} discs")
        edit_overrides = [f"source.model={models['discs']}", *so, *([f"hspace.steps={steps}"] if steps else [])]
        edit_jobs = hspace_edit(base, cfg_dir, edit_overrides, edit_examples, edits, opts, out)

    guide_jobs = None
    if guides:
        step(f"5/6 guidance in latent space (CycleDiffusion) through the discs model: {guides} seeds unguided, then "
             "guided by the hue energy (configs/demo/guide.yaml)")
        guide_jobs = guide_runs(base, cfg_dir, [f"source.model={models['discs']}", *common], guides, out)

    step("6/6 measuring (shapes, reconstruction gates, novelty, edits, guidance) and writing the report")
    local = _localise(base, opts, out_dir) if s3_endpoint else out_dir
    sources = read_images(local / "inputs" / "discs")
    translated = read_images(local / "translated" / "images")
    plain = plain_samples(models["discs"], plain_count, steps or 50)
    tm = translation_metrics(sources, translated, "squares")
    keys = sorted(set(sources) & set(translated))[:16]
    sheet = [("source discs", [sources[k] for k in keys]), ("translated (squares model)", [translated[k] for k in keys]),
             ("plain discs-model samples", list(plain[:16]))]
    rows = {}
    for domain in domains:
        rows[domain], domain_sheet = measure_domain(domain, jobs[domain], local)
        sheet += domain_sheet
    edit_row = None
    if edit_jobs:
        edit_row, edit_sheet = measure_edit(edit_jobs, local)
        sheet += edit_sheet
    guide_row = None
    if guide_jobs:
        guide_row, guide_sheet = measure_guide(guide_jobs, local)
        sheet += guide_sheet
    plain_labels = label_counts(measure_shapes(plain)["label"])
    report = {
        "translation": {**tm, "mean_psnr": t_summary.get("mean_psnr"), "mean_ssim": t_summary.get("mean_ssim"),
                        "images": t_summary["images"], "rejected": t_summary["rejected"], "fid": fid_row},
        "unseen": {
            "count": unseen, "main_domain": MAIN_DOMAIN, "modes": [[n, list(o)] for n, o in SAMPLING_MODES],
            "plain_discs_model": {"count": len(plain), "steps": steps or 50, "triangle_rate": shape_rate(plain, "triangles"),
                                  "disc_rate": shape_rate(plain, "discs"), "labels": plain_labels},
            "domains": rows,
        },
        "edit": edit_row,
        "guide": guide_row,
        "targets": TARGETS,
        "galleries": [f"{base}/translated/gallery/index.html", *([f"{base}/edit/edited/gallery/index.html"] if edit_jobs else [])],
        "seconds": round(time.time() - started, 1), "models": models, "out": str(out_dir),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.png").write_bytes(contact_sheet(sheet))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    out.write(format_table(report))
    return report


def _localise(base: str, opts: dict, out_dir: Path) -> Path:
    """Copy the demo's S3 outputs to out_dir for measuring (the --s3 variant)."""
    from pipeline.data.filesystems import url_to_fs

    fs, root = url_to_fs(base, opts)
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if rel.endswith(".tar"):
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(dest))
    return out_dir


def format_table(r: dict) -> str:
    t, u, targets = r["translation"], r["unseen"], r["targets"]
    plain = u["plain_discs_model"]
    lines = [
        "",
        "latentshift demo — results",
        "  translation discs → squares (CycleDiffusion, two independently trained models)",
        f"    target-shape rate      {fmt(t.get('target_shape_rate'), pct=True):>8}   (target ≥ 80%)",
        f"    median hue error       {fmt(t.get('median_hue_error_deg'), unit='°'):>8}   (target ≤ 15°)",
        f"    median centroid shift  {fmt(t.get('median_centroid_shift_px'), unit=' px'):>8}   (target ≤ 2 px)",
        f"    PSNR / SSIM vs source  {fmt(t.get('mean_psnr'), unit=' dB')} / {fmt(t.get('mean_ssim'))}",
        *(fid_lines(t["fid"]) if t.get("fid") else []),
        f"  unseen-domain synthesis through the discs-only model ({u['count']} images per mode)",
        f"    plain discs-model samples: triangles {fmt(plain['triangle_rate'], pct=True)}, "
        f"discs {fmt(plain['disc_rate'], pct=True)}",
    ]
    for name, d in u["domains"].items():
        lines += domain_lines(name, d, targets)
    if r.get("edit"):
        lines += edit_lines(r["edit"])
    if r.get("guide"):
        lines += guide_lines(r["guide"])
    lines += [f"  report: {r['out']}/report.png, report.json   ({r['seconds']} s)",
              *(f"  gallery: {g}" for g in r.get("galleries", [])), ""]
    return "\n".join(lines)
