"""``latentshift``: the command line. Each command takes ``--config FILE [--set k=v …]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.errors import ConfigError, LatentshiftError


def _version() -> str:
    try:
        return version("latentshift")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="job config (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (parsed as YAML: numbers, true/false, null, [lists]); repeatable",
    )


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (YAML) after overrides and validation."""
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(f"# config hash {cfg.config_hash()}\n")
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """Any registered job: run it through the run envelope over every uncommitted shard."""
    from pipeline.config import load_config
    from pipeline.jobs import run_job

    cfg = load_config(args.config, args.overrides)
    options = {o.dest: getattr(args, o.dest) for o in args.job.options}
    summary = run_job(cfg, args.job.name, overwrite=args.overwrite, **options)
    return 1 if summary.get("incomplete_shards") else 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a job to a running Ray cluster (Ray Jobs SDK), guarded against double submission."""
    from pipeline.cluster.submit import submit

    ship = {"auto": None, "yes": True, "no": False}[args.ship_source]
    return submit(args.config, args.overrides, job=args.job, address=args.address, wait=args.wait,
                  ship_source=ship, window_minutes=args.window, rerun=args.rerun)


def cmd_fire_rayjob(args: argparse.Namespace) -> int:
    """One firing of a plain-CronJob schedule: create a RayJob from a suspended template RayJob."""
    from pipeline.cluster.fire_rayjob import main as fire_main

    return fire_main(args.template, args.namespace, args.firing, args.api_server)


def cmd_shards_pack(args: argparse.Namespace) -> int:
    from pipeline.data.shards import pack_folder

    written = pack_folder(args.src, args.dst, per_shard=args.per_shard, prefix=args.prefix)
    for w in written:
        print(w)
    print(f"{len(written)} shards written", file=sys.stderr)
    return 0


def cmd_shards_ls(args: argparse.Namespace) -> int:
    from pipeline.data.shards import count_samples, list_shards

    total = 0
    for ref in list_shards(args.uri):
        n, damage = count_samples(ref)
        total += n
        print(f"{ref.uri}\t{n}" + (f"\tDAMAGED: {damage}" if damage else ""))
    print(f"{total} samples", file=sys.stderr)
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from pipeline.demo.shapes import write_shapes

    for path in write_shapes(args.domain, args.count, args.out, seed=args.seed, per_shard=args.per_shard,
                             aligned=args.aligned):
        print(path)
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.demo.train import TrainConfig, train

    out = args.out or str(Path(__file__).parent / "assets" / args.domain)
    record = train(TrainConfig(domain=args.domain, out=out, steps=args.steps, batch=args.batch, seed=args.seed),
                   resume=not args.restart)
    print(f"saved {out}: final loss {record['final_loss_last200']:.4f} after {args.steps} steps")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo.run import run_demo

    if not args.s3:
        run_demo(args.out, discs=args.discs, triangles=args.triangles, unseen=args.unseen, steps=args.steps)
        return 0
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("latentshift: --s3 needs moto's server: pip install 'moto[server]'", file=sys.stderr)
        return 2
    import os
    import socket

    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for var, value in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo"), ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(var, value)  # the throwaway server accepts any credentials
    endpoint = f"http://127.0.0.1:{port}"
    try:
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("latentshift-demo")
        run_demo(args.out, discs=args.discs, triangles=args.triangles, unseen=args.unseen, steps=args.steps,
                 s3_endpoint=endpoint)
    finally:
        server.stop()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.tools.bench import random_config, run_bench

    if args.random and args.config:
        raise ConfigError("bench takes --config or --random, not both")
    if args.fid:
        from pipeline.tools.fid_bench import run_fid_bench

        if args.config or args.random:
            raise ConfigError("bench --fid takes neither --config nor --random (it times the FID feature network alone)")
        run_fid_bench(images=args.images or 512)
        return 0
    if args.search:
        from pipeline.tools.search_bench import run_search_bench

        if args.config or args.random not in (None, "sd-1", "tiny-sd"):
            raise ConfigError("bench --search takes --random sd-1 or tiny-sd (a text-to-image model)")
        run_search_bench(args.random or "sd-1", images=args.images, trials=args.trials)
        return 0
    args.images = args.images or 64
    if not args.random:
        run_bench(load_config(args.config, args.overrides), images=args.images, per_shard=args.per_shard,
                  peer=not args.no_peer)
        return 0
    with tempfile.TemporaryDirectory(prefix="latentshift-models-") as tmp:
        cfg = random_config(args.random, Path(tmp), args.overrides)
        run_bench(cfg, images=args.images, per_shard=args.per_shard, peer=not args.no_peer)
    return 0


def _add_job_commands(sub) -> None:
    """One command per registered job; jobs whose command has two words share a group (``ood fit``)."""
    from pipeline.jobs import JOBS

    groups = {}
    for job in JOBS.values():
        parent = sub
        if len(job.command) == 2:
            group = job.command[0]
            if group not in groups:
                g = sub.add_parser(group, help=GROUP_HELP.get(group, ""))
                groups[group] = g.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND", required=True)
            parent = groups[group]
        p = parent.add_parser(job.command[-1], help=job.help)
        _add_config_args(p)
        p.add_argument("--overwrite", action="store_true",
                       help="redo shards that are already committed (ood fit: fit again even if up to date)")
        for o in job.options:
            p.add_argument(o.flag, dest=o.dest, metavar=o.metavar, help=o.help)
        p.set_defaults(func=cmd_job, job=job)


GROUP_HELP = {"ood": "unseen-domain synthesis: fit OOD latent statistics, sample from them",
              "direction": "h-space editing: fit a direction for `latentshift edit`"}


def cmd_lpips_export(args: argparse.Namespace) -> int:
    from pipeline.metrics.lpips_net import export_lpips

    export_lpips(args.path, args.net)
    print(f"LPIPS ({args.net}) written to {args.path}; use it as hspace.lpips")
    return 0


def cmd_fid_export(args: argparse.Namespace) -> int:
    from pipeline.tools.fid_export import export

    info = export(args.path, source=args.source, file=args.from_file)
    probe = (f"; features equal to the source network's to {info['probe_difference']:.1e} of their scale"
             if info["probe_difference"] is not None else "")
    print(f"FID Inception ({info['source']}, sha256 {info['source_sha256'][:12]}…) written to {info['path']}{probe}; "
          "use it as eval.inception")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from pipeline.tools.import_checkpoint import import_checkpoint

    keys = None
    if args.arch_keys:
        try:
            keys = json.loads(Path(args.arch_keys).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"models import: --arch-keys {args.arch_keys}: not a readable JSON object ({exc})") from None
    record = import_checkpoint(args.src, args.dst, preset=args.preset, arch=args.arch, arch_keys=keys, item=args.item)
    print(f"{args.src} (sha256 {record['sha256'][:16]}…, {record['source_keys']} tensors) → {args.dst}: "
          f"{record['family']} {record['preset'] or 'architecture from --arch-keys'}; use it as source.model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentshift",
        description=(
            "Translate, invert, edit and extend image datasets through the latent spaces of frozen "
            "diffusion models, as Ray Data batch jobs."
        ),
    )
    parser.add_argument("--version", action="version", version=f"latentshift {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks (Python's, Ray's workers') on the console")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="validate a job config and print it resolved")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    _add_job_commands(sub)

    from pipeline.jobs import JOBS

    p = sub.add_parser("submit", help="submit a job to a running Ray cluster (RAY_ADDRESS or --address)")
    _add_config_args(p)
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--job", choices=list(JOBS), default="translate", help="which job to run (default: translate)")
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit non-zero if it fails")
    p.add_argument("--window", type=int, default=60, metavar="MINUTES",
                   help="an identical submission within this window is refused (default: 60)")
    p.add_argument("--rerun", action="store_true",
                   help="submit even if an identical submission exists in this window (committed shards are skipped)")
    p.add_argument("--ship-source", choices=["auto", "yes", "no"], default="auto",
                   help="ship this checkout's code as working_dir (auto: yes when run from a checkout; "
                        "no: use the code in the cluster's image)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("fire-rayjob", help="(in a CronJob pod) create this firing's RayJob from a suspended template")
    p.add_argument("--template", required=True, help="name of the suspended template RayJob")
    p.add_argument("--namespace", help="default: the pod's own namespace")
    p.add_argument("--firing", help="firing id (default: $FIRING, the CronJob's Job name)")
    p.add_argument("--api-server", help="Kubernetes API URL (default: in-cluster); token from $KUBE_TOKEN")
    p.set_defaults(func=cmd_fire_rayjob)

    p = sub.add_parser("demo", help="run the whole pipeline on the bundled shape models, with a report")
    p.add_argument("--out", default="latentshift-demo", help="output folder (default: ./latentshift-demo)")
    p.add_argument("--s3", action="store_true", help="run against a throwaway local S3 server (needs moto[server])")
    p.add_argument("--discs", type=int, default=128)
    p.add_argument("--triangles", type=int, default=64)
    p.add_argument("--unseen", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="override sampler steps (faster, rougher)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("shapes", help="generate a demo shape domain as WebDataset shards")
    p.add_argument("--domain", required=True, choices=["discs", "squares", "triangles"])
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True, metavar="URI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--aligned", action="store_true",
                   help="fixed, centred 20 px box (only the colour varies), as the paper's aligned datasets")
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("train-demo", help="train a bundled demo DDPM on a shape domain (resumes from its checkpoint)")
    p.add_argument("--domain", required=True, choices=["discs", "squares", "triangles"])
    p.add_argument("--out", help="diffusers folder to write (default: pipeline/assets/<domain>)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("bench", help="translate on generated images: pipeline vs bare loop vs diffusers, GPU busy")
    _add_config_args(p)
    p.add_argument("--random", choices=("ddpm-256", "sd-1", "tiny-pixel", "tiny-sd"),
                   help="random-weight models of this shape instead of a config's (--set still applies)")
    p.add_argument("--images", type=int, default=None, help="images to run (default 64; --search: 2 for sd-1)")
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--no-peer", action="store_true", help="skip diffusers' CycleDiffusionPipeline (zero-shot configs)")
    p.add_argument("--search", action="store_true",
                   help="the zero-shot search's candidates/s against the official loop (see docs/performance.md)")
    p.add_argument("--trials", type=int, default=1, help="--search: trials timed (the official grid's 15 are scaled)")
    p.add_argument("--fid", action="store_true",
                   help="the eval job's feature cost: FID Inception images/s and seconds per 1000 images (docs/eval.md)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("lpips-export", help="(online, once) write the LPIPS network to a safetensors file for hspace.lpips")
    p.add_argument("path")
    p.add_argument("--net", choices=("alex", "vgg", "squeeze"), default="alex")
    p.set_defaults(func=cmd_lpips_export)

    p = sub.add_parser("fid-export", help="(online, once) write the FID Inception network to a safetensors file for eval.inception")
    p.add_argument("path")
    p.add_argument("--source", choices=("clean-fid", "pytorch-fid"), default="clean-fid",
                   help="whose weights: clean-fid's TorchScript (default, what clean-fid's clean mode uses) or pytorch-fid's")
    p.add_argument("--from", dest="from_file", metavar="FILE",
                   help="the source's file fetched by other means (no download)")
    p.set_defaults(func=cmd_fid_export)

    models = sub.add_parser("models", help="import the papers' published checkpoints as model folders")
    models_sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    p = models_sub.add_parser("import", help="a published DDPM or ADM checkpoint (.pt/.ckpt, local or s3://) → a diffusers model folder")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--preset", help="the published file's architecture: celeba-hq-256, lsun-church-256, lsun-bedroom-256 (DDPM); "
                        "afhq-256, ffhq-256, imagenet-256 (ADM)")
    p.add_argument("--arch", help="instead of --preset: the family (ddpm | adm), with --arch-keys")
    p.add_argument("--arch-keys", metavar="FILE.json", help="the family's architecture keys (e.g. ch, ch_mult, resolution)")
    p.add_argument("--item", type=int, default=0,
                   help="which state dict of a list checkpoint (ermongroup/ddim training checkpoints: -1, the EMA)")
    p.set_defaults(func=cmd_models_import)

    shards = sub.add_parser("shards", help="pack image folders into WebDataset shards; list shards")
    shard_sub = shards.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", required=True)
    p = shard_sub.add_parser("pack", help="pack a folder (or prefix) of images into shards with stable keys")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="shard", help="shard basename prefix (default: shard)")
    p.set_defaults(func=cmd_shards_pack)
    p = shard_sub.add_parser("ls", help="list shards with their sample counts")
    p.add_argument("uri")
    p.set_defaults(func=cmd_shards_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from pipeline.runtime.ray_env import show_traces

    show_traces(args.verbose)
    try:
        return int(args.func(args) or 0)
    except LatentshiftError as exc:  # the user's to fix: one line, exit 2
        if args.verbose:
            traceback.print_exception(exc)
        print(f"latentshift: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: still one line (the traceback with --verbose), exit 1
        from pipeline.runtime.models import root_reason

        if args.verbose:
            traceback.print_exception(exc)
        hint = "" if args.verbose else "; run with --verbose for the traceback"
        print(f"latentshift: unexpected error (a bug, please report it): {root_reason(exc)}{hint}",
              file=sys.stderr)
        return 1


def run_registered(name: str, argv: list[str]) -> int:
    """A ``jobs/<name>.py`` entrypoint: the registered job's own command with ``argv``."""
    from pipeline.jobs import get

    return main([*get(name).command, *argv])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
