"""A failure on a Ray actor (or in a Ray task, ``runtime.pool: tasks``) ends the CLI in one line, naming the config key and the file, with
no traceback on the console (Ray's log files keep them; ``--verbose`` shows them).

Preflight catches what it can before Ray starts; these tests change a file after preflight
and before the actors load it (the CLI runs in a subprocess whose ``init_ray`` first applies
the change), so the failure happens on the actor whatever preflight checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shard_builders import good_samples

from pipeline.data.shards import write_samples

# The CLI (pipeline.cli.main) with one change: right after preflight, when the run starts Ray,
# CHANGE_FILE gets the bytes of CHANGE_SOURCE, so that the actor loads what preflight did not see.
CLI_WITH_A_CHANGE_AFTER_PREFLIGHT = """
import os, shutil, sys
import pipeline.runtime.ray_env as ray_env
real_init_ray = ray_env.init_ray
def init_ray():
    shutil.copyfile(os.environ["CHANGE_SOURCE"], os.environ["CHANGE_FILE"])
    real_init_ray()
ray_env.init_ray = init_ray
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args: list[str], change_file: Path, change_source: Path) -> subprocess.CompletedProcess:
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, CHANGE_FILE=str(change_file),
               CHANGE_SOURCE=str(change_source))
    return subprocess.run([sys.executable, "-c", CLI_WITH_A_CHANGE_AFTER_PREFLIGHT, *args], capture_output=True,
                          text=True, timeout=150, env=env)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``latentshift:`` line on stderr, after checking there is no traceback anywhere."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-4000:]
    assert "SIGABRT" not in output and "Stack trace" not in output, output[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("latentshift:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert proc.stderr.rstrip().endswith(lines[0])
    return lines[0]


def write_inputs(folder: Path, shard: int = 0) -> Path:
    folder.mkdir()
    with open(folder / "shard-000.tar", "wb") as f:
        write_samples(f, good_samples(shard, 3))
    return folder


def test_a_model_that_changed_after_preflight_is_one_line_naming_the_key(ray_cluster, tmp_path, pixel_model):
    """Weights that no longer fit the UNet's config (changed after the preflight's check): exit 2,
    one line naming ``target.model`` and its folder; with --verbose the actor's traceback too."""
    import shutil

    write_inputs(tmp_path / "in")
    target = Path(shutil.copytree(pixel_model, tmp_path / "target"))
    unet_config = json.loads((target / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [2 * c for c in unet_config["block_out_channels"]]
    (tmp_path / "mismatched.json").write_text(json.dumps(unet_config))
    cfg = {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
           "source": {"model": str(pixel_model)}, "target": {"model": str(target)},
           "sampler": {"steps": 4, "eta": 0.3, "strength": 0.5}, "image": {"size": 16},
           "runtime": {"batch_size": 4, "actors": 1, "pool": "actors"}}  # the next test: tasks (auto here)
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    change = (target / "unet" / "config.json", tmp_path / "mismatched.json")

    proc = run_cli(["translate", "-c", str(tmp_path / "cfg.yaml")], *change)
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = one_line(proc)
    assert line.startswith(f"latentshift: target.model = {target}: "), line
    assert "conv_in" in line and "export it again" in line, line

    shutil.copyfile(pixel_model / "unet" / "config.json", target / "unet" / "config.json")  # as preflight wants
    verbose = run_cli(["--verbose", "translate", "-c", str(tmp_path / "cfg.yaml"), "--overwrite"], *change)
    assert verbose.returncode == 2, verbose.stderr[-4000:]
    assert "Traceback (most recent call last)" in verbose.stdout + verbose.stderr
    # --verbose forwards the workers' output as Ray prints it, whenever it arrives: the dying actor's dump may
    # land after the CLI's line, so the line is checked to be there (and the only one), not to be last
    assert [x for x in verbose.stderr.splitlines() if x.startswith("latentshift:")] == [line]


def test_an_lpips_file_corrupted_after_preflight_names_hspace_lpips(ray_cluster, tmp_path, pixel_model):
    """``direction fit`` with ``t_edit: auto``: the LPIPS file is cut short after preflight; the line
    names ``hspace.lpips`` and the file (not the diffusion model), exit 2. The stage runs in Ray tasks
    (``runtime.pool: tasks``; the test before runs an actor), whose failure reaches the driver as text."""
    from pipeline.tools.random_clip import save_random_lpips

    write_inputs(tmp_path / "in")
    write_inputs(tmp_path / "examples", shard=1)
    lpips = Path(save_random_lpips(str(tmp_path / "lpips.safetensors")))
    (tmp_path / "cut-short.safetensors").write_bytes(lpips.read_bytes()[: lpips.stat().st_size // 2])
    cfg = {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
           "source": {"model": str(pixel_model)},
           "hspace": {"direction": str(tmp_path / "dirs" / "d.safetensors"), "examples": str(tmp_path / "examples"),
                      "t0": 999, "steps": 6, "t_edit": "auto", "t_boost": "auto", "lpips": str(lpips)},
           "image": {"size": 16}, "runtime": {"batch_size": 4, "actors": 1, "pool": "tasks"}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))

    proc = run_cli(["direction", "fit", "-c", str(tmp_path / "cfg.yaml")], lpips, tmp_path / "cut-short.safetensors")
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = one_line(proc)
    # the loader's own ConfigError, or loading()'s "hspace.lpips = FILE: reason; fix": the key and the file
    assert "hspace.lpips" in line and str(lpips) in line, line
    assert "source.model" not in line and str(pixel_model) not in line, line


@pytest.mark.parametrize("verbose", [False, True])
def test_a_bug_on_an_actor_is_one_line_exit_1(ray_cluster, monkeypatch, capsys, verbose):
    """Ray Data's "UDF failed to process a data block" around an unexpected error: exit 1, one line
    with the worker's own error and the --verbose hint; with --verbose the traceback."""
    import ray.data

    import pipeline.jobs
    from pipeline import cli

    class Boom:  # defined here so that Ray pickles it by value (workers cannot import this module)
        """A stage with a bug: its batch raises an error no user can act on."""

        def __call__(self, batch):
            raise ValueError("a bug in a stage")

    def run_job(*args, **kwargs):
        ray.data.range(2).map_batches(Boom, compute=ray.data.ActorPoolStrategy(size=1)).materialize()

    monkeypatch.setattr("pipeline.runtime.ray_env._show_traces", False)  # main sets it; restored after
    monkeypatch.setattr(pipeline.jobs, "run_job", run_job)
    monkeypatch.setattr("pipeline.config.load_config", lambda *a, **k: None)
    code = cli.main([*(["--verbose"] if verbose else []), "translate", "-c", "unused.yaml"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("latentshift:")]
    assert len(lines) == 1, err[-4000:]
    assert "ValueError: a bug in a stage (on a Ray worker)" in lines[0], lines[0]
    assert ("--verbose" in lines[0]) is not verbose
    assert ("Traceback (most recent call last)" in err) is verbose
