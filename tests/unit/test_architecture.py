"""The architecture docs/development.md states, held against the code: layers, the row schema, the registry."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "pipeline"

# Imports point down this list only (a layer may use any layer below it; config and errors are
# for everyone). diffusion, data and metrics are one level but must not use each other's code
# except as stated in ALLOWED_SIDEWAYS. model_layout is shared because the model store (data)
# checks a model folder against the same family description the denoiser (diffusion) loads it by.
LAYERS = [
    {"cli"},
    {"cluster", "demo", "tools"},
    {"jobs"},
    {"runtime"},
    {"stages"},
    {"diffusion", "data", "metrics"},
]
SHARED = {"config", "errors", "assets", "model_layout"}
ALLOWED_SIDEWAYS: set[tuple[str, str]] = set()


def _layer(part: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    return None


def _pipeline_imports(path: Path) -> set[str]:
    """Every pipeline.* module a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")}


def violations(pkg: Path) -> list[str]:
    problems = []
    for path in sorted(pkg.rglob("*.py")):
        mine = path.relative_to(pkg).parts[0].removesuffix(".py")
        here = _layer(mine)
        for module in _pipeline_imports(path):
            parts = module.split(".")
            if len(parts) < 2:
                continue
            other = parts[1]
            there = _layer(other)
            if other in SHARED or other == mine or there is None or here is None:
                continue
            if there < here or (there == here and (mine, other) not in ALLOWED_SIDEWAYS):
                problems.append(f"{path.relative_to(pkg.parent)} ({mine}) imports {module} ({other})")
    return problems


def test_imports_point_down_the_layers():
    problems = violations(PKG)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_upward_and_sideways_imports(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "stages" / "x.py").write_text("def f():\n    from pipeline.jobs import JOBS\n")
    (tmp_path / "data" / "y.py").write_text("from pipeline.diffusion.latent import Latent\nfrom pipeline.errors import E\n")
    found = violations(tmp_path)
    assert len(found) == 2 and "imports pipeline.jobs" in found[1] and "imports pipeline.diffusion.latent" in found[0]


def test_data_has_no_torch_and_diffusion_has_no_storage():
    for path in (PKG / "data").glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in mods if m.split(".")[0] in ("torch", "diffusers", "transformers")}, path.name
    for path in (PKG / "diffusion").glob("*.py"):
        text = path.read_text()
        assert "fsspec" not in text and "snapshot_download" not in text and "model_cache" not in text, path.name


def test_stages_exchange_typed_columns_not_strings():
    """No JSON and no joined shapes between stages; stages take config sections, not the job config."""
    for path in (PKG / "stages").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import json|json\.(dumps|loads)", text, re.M), path.name
        assert '",".join' not in text and 'split(",")' not in text, path.name
        assert "JobConfig" not in text, path.name


def test_every_boundary_column_is_in_the_schema():
    from pipeline.data import rows

    for name in ("INPUT_COLUMNS", "PIXEL_COLUMNS", "LATENT_INPUT_COLUMNS", "CANDIDATE_COLUMNS", "OUTPUT_COLUMNS",
                 "MANIFEST_COLUMNS"):
        missing = [c for c in getattr(rows, name) if c not in rows.COLUMNS]
        assert not missing, f"{name}: {missing}"


def test_row_buffer_types_columns_and_refuses_unknown_ones():
    import numpy as np

    from pipeline.data.rows import OUTPUT_COLUMNS, RowBuffer, RowKind

    rows = RowBuffer()
    rows.add(shard="s", key="a", index=0, kind=RowKind.SAMPLE, pixels=np.ones((2, 2, 3), np.uint8), psnr=30.0)
    rows.add(shard="s", key="a", index=0, kind=RowKind.LATENT, step=1, latent=np.zeros((3, 2, 2), np.float16))
    b = rows.batch()
    assert set(b) == set(OUTPUT_COLUMNS)
    assert b["kind"].dtype == np.int8 and b["index"].dtype == np.int64 and b["step"].tolist() == [-1, 1]
    assert b["pixels"][1].shape == (0, 0, 3) and b["latent"][0].shape == (0, 0, 0)  # empty, same ndim
    assert np.isnan(b["psnr"][1]) and b["psnr"][0] == np.float32(30.0)
    with pytest.raises(KeyError, match="info"):
        rows.add(info="{}")


def test_one_registry_drives_cli_entrypoints_and_submit():
    from pipeline.cli import build_parser
    from pipeline.config import JobConfig
    from pipeline.jobs import JOBS

    parser = build_parser()
    submit = next(a for a in parser._subparsers._group_actions[0].choices["submit"]._actions if a.dest == "job")
    assert set(submit.choices) == set(JOBS)
    for name, job in JOBS.items():
        args = parser.parse_args([*job.command, "--config", "x.yaml"])
        assert args.job is job
        entry = ROOT / "jobs" / f"{name.replace('-', '_')}.py"
        assert entry.is_file() and f'run_registered("{name}"' in entry.read_text(), entry
        for key in job.requires:  # every key a job requires exists in the config schema
            section, field = key.split(".")
            assert field in JobConfig.model_fields[section].annotation.model_fields, key
    assert isinstance(parser, argparse.ArgumentParser)


def test_one_secret_name_rule_for_refusing_and_redacting():
    from pipeline.config import validate
    from pipeline.data.filesystems import is_secret_name, secret_keys_in
    from pipeline.errors import ConfigError

    for name in ("secret", "aws_secret_access_key", "session_token", "password", "client_secret", "key"):
        assert is_secret_name(name) and secret_keys_in({"a": {name: "x"}}) == [f"a.{name}"]
    assert not is_secret_name("endpoint_url") and not is_secret_name("region_name")
    with pytest.raises(ConfigError) as err:
        validate({"input": {"storage_options": {"db_password": "hunter2"}}})
    assert "hunter2" not in str(err.value) and "db_password" in str(err.value)
