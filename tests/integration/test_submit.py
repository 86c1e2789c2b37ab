"""Job submission against a real Ray head (`ray start --head` on loopback), as users submit jobs.

The head runs in its own process group with its own temp dir, so it never meets the test session's
own Ray; it is stopped by its pid at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from shard_builders import good_samples, tar_bytes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Head:
    address: str
    token: Path


def auth_env(token: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="lshead", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    token = Path(temp) / "auth_token"  # Ray >= 2.5x enables token auth; this head has its own token
    token.write_text(secrets.token_hex(16))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           **auth_env(token)}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp}",
         "--disable-usage-stats",
         # the test session's own Ray holds the default agent ports: this head's agents need others
         *(f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "metrics-export-port", "runtime-env-agent-port",
                                                 "ray-client-server-port", "node-manager-port",
                                                 "object-manager-port"))],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            ask = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token.read_text()}"})
            urllib.request.urlopen(ask, timeout=5).read()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if head.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"ray head did not come up:\n{(Path(temp) / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
    # the dashboard answers before the node's job agent is up; a first trivial job proves it is
    while (probe := subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                                   env=env, capture_output=True, text=True, timeout=120)).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"ray head takes no jobs: {probe.stderr[-1500:]}\n{(Path(temp) / 'head.log').read_text()[-1500:]}")
        time.sleep(2)
    yield Head(address, token)
    # This head is thrown away with its temp dir: kill `ray start --block` and every process of its
    # Ray at once (each names the temp dir on its command line) instead of waiting ~30 s for its
    # graceful stop on SIGTERM.
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == head.pid or temp in " ".join(proc.info.get("cmdline") or []):
            try:
                proc.kill()
            except psutil.Error:
                pass
    head.wait()
    try:
        os.killpg(head.pid, signal.SIGKILL)  # anything left in its process group
    except ProcessLookupError:
        pass
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def write_config(path: Path, data_dir: Path, source: Path, target: Path) -> Path:
    cfg = {
        "input": {"uri": str(data_dir / "in")},
        "output": {"uri": str(data_dir / "out")},
        "source": {"model": str(source)},
        "target": {"model": str(target)},
        "sampler": {"steps": 4, "eta": 0.5, "strength": 0.5},
        "image": {"size": 16},
        "runtime": {"batch_size": 4, "actors": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def add_shard(data_dir: Path, index: int, n: int = 3) -> None:
    (data_dir / "in").mkdir(parents=True, exist_ok=True)
    (data_dir / "in" / f"shard-{index}.tar").write_bytes(tar_bytes(good_samples(index, n)))


def submit(*args: str, head: Head, timeout: int = 300, token: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": head.address, **(auth_env(head.token) if token else {})}
    if not token:
        env.pop("RAY_AUTH_MODE", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    return subprocess.run([str(BIN / "latentshift"), "submit", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tempfile.gettempdir())


def ledger(out_dir: Path) -> tuple[dict[str, dict], list[dict]]:
    shards = {p.stem: json.loads(p.read_text()) for p in (out_dir / "_ledger").glob("*.json")}
    runs = sorted((json.loads(p.read_text()) for p in (out_dir / "_ledger" / "runs").glob("*.json")),
                  key=lambda r: r["run_id"])
    return shards, runs


def output_files(out_dir: Path) -> dict[str, float]:
    return {str(p.relative_to(out_dir)): p.stat().st_mtime_ns for p in out_dir.rglob("*")
            if p.is_file() and "_ledger" not in p.parts}


def test_submit_wait_succeeds_and_a_double_submission_is_refused(ray_head, tmp_path, pixel_model,
                                                                  other_pixel_model):
    data = tmp_path / "data"
    add_shard(data, 0)
    add_shard(data, 1)
    config = write_config(tmp_path / "job.yaml", data, pixel_model, other_pixel_model)

    first = submit("--config", str(config), "--wait", head=ray_head)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "SUCCEEDED" in first.stdout and "submitted latentshift-translate-" in first.stdout
    assert "2 done, 0 skipped" in first.stdout  # the job's own summary, streamed back
    shards, runs = ledger(data / "out")
    assert set(shards) == {"shard-0", "shard-1"} and len(runs) == 1
    images = sorted((data / "out" / "images").glob("*.tar"))
    assert [p.name for p in images] == ["shard-0.tar", "shard-1.tar"]
    before = output_files(data / "out")

    again = submit("--config", str(config), "--wait", head=ray_head)
    assert again.returncode == 2 and "refused: the same job and config was already submitted" in again.stderr
    assert "SUCCEEDED" in again.stderr  # names the earlier submission's state
    assert len(ledger(data / "out")[1]) == 1  # nothing ran

    # run it again on purpose: committed shards are skipped, no output is written twice
    # (and with the code the cluster has installed, as against the project image: only the config is shipped)
    rerun = submit("--config", str(config), "--wait", "--rerun", "--ship-source", "no", head=ray_head)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "code from the cluster image" in rerun.stdout
    assert "0 done, 2 skipped" in rerun.stdout
    assert output_files(data / "out") == before
    assert len(ledger(data / "out")[1]) == 2


def test_a_failing_job_makes_submit_wait_exit_non_zero_with_its_error(ray_head, tmp_path, pixel_model):
    data = tmp_path / "data"
    add_shard(data, 0)
    missing = tmp_path / "no-such-model"
    config = write_config(tmp_path / "job.yaml", data, pixel_model, missing)  # valid config, bad model inside
    out = submit("--config", str(config), "--wait", head=ray_head)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" in out.stdout
    assert str(missing) in out.stdout  # the job's own error message, streamed back
    assert not (data / "out" / "images").exists() or not list((data / "out" / "images").glob("*.tar"))


def test_a_bad_config_is_refused_before_the_cluster_sees_it(ray_head, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("sampler: {steps: 0}\n")
    out = submit("--config", str(config), head=ray_head)
    assert out.returncode == 2 and "sampler.steps = 0" in out.stderr and "submitted" not in out.stdout


def test_scheduled_runs_process_only_new_shards(ray_head, tmp_path, pixel_model, other_pixel_model):
    """What a RayCronJob / CronJob firing runs: `ray job submit -- python jobs/translate.py --config F`."""
    data = tmp_path / "data"
    add_shard(data, 0)
    add_shard(data, 1)
    config = write_config(tmp_path / "job.yaml", data, pixel_model, other_pixel_model)
    env = {**os.environ, "RAY_ADDRESS": ray_head.address, **auth_env(ray_head.token)}

    def fire() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--", "python", str(ROOT / "jobs" / "translate.py"),
             "--config", str(config)],
            capture_output=True, text=True, timeout=300, env=env,
        )

    first = fire()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    shards, runs = ledger(data / "out")
    assert set(shards) == {"shard-0", "shard-1"}
    kept = {name: (data / "out" / "_ledger" / f"{name}.json").read_text() for name in shards}

    add_shard(data, 2)  # new data lands between two firings
    second = fire()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    shards, runs = ledger(data / "out")
    assert set(shards) == {"shard-0", "shard-1", "shard-2"}
    assert [(r["shards_done"], r["shards_skipped"]) for r in runs] == [(2, 0), (1, 2)]
    assert shards["shard-2"]["run_id"] == runs[1]["run_id"]
    for name, text in kept.items():  # earlier commits untouched
        assert (data / "out" / "_ledger" / f"{name}.json").read_text() == text


def test_a_cluster_with_token_auth_refuses_a_client_without_the_token(ray_head, tmp_path, pixel_model):
    config = write_config(tmp_path / "job.yaml", tmp_path / "data", pixel_model, pixel_model)
    out = submit("--config", str(config), head=ray_head, token=False)
    assert out.returncode == 2 and "RAY_AUTH_TOKEN" in out.stderr
    assert ray_head.token.read_text() not in out.stderr + out.stdout
