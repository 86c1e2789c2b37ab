"""``latentshift``: the command line. Each command takes ``--config FILE [--set k=v …]``."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from pipeline.errors import LatentshiftError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentshift",
        description=(
            "Translate, invert, edit and extend image datasets through the latent spaces of frozen "
            "diffusion models, as Ray Data batch jobs."
        ),
    )
    parser.add_argument("--version", action="version", version=f"latentshift {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="validate a job config and print it resolved")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
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
    try:
        return int(args.func(args) or 0)
    except LatentshiftError as exc:
        print(f"latentshift: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
