"""``latentshift submit``: run a job on a running Ray cluster through the Ray Jobs SDK.

The submission id is derived from the job, the resolved config's hash and a time window, so
submitting the same thing twice (a double click, a retried CI step) is refused rather than run
twice. A failed or stopped earlier submission does not block a retry: it gets the next suffix.
Outputs are exactly-once anyway (committed shards are skipped); the guard keeps two copies of
one job from competing for the same GPUs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import LatentshiftError

SHIPPED_CONFIG = "latentshift-job.yaml"  # the resolved config, inside the shipped working_dir
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BLOCKING = {"PENDING", "RUNNING", "SUCCEEDED"}  # an earlier submission in one of these refuses a new one


class SubmissionRefused(LatentshiftError):
    """The same job and config was already submitted in this window and has not failed."""


def submission_id(job: str, config_hash: str, now: float, window_minutes: int) -> str:
    """``latentshift-<job>-<config hash>-<window start, UTC>``: equal for equal submissions in one window."""
    window = max(1, int(window_minutes)) * 60
    start = time.strftime("%Y%m%d-%H%M", time.gmtime(int(now // window) * window))
    return f"latentshift-{job}-{config_hash[:12]}-{start}"


def next_free_id(base: str, earlier: dict[str, str]) -> str:
    """The id to submit under, given earlier submissions {id: status}; refuses a live or finished twin."""
    candidate, retry = base, 0
    while candidate in earlier:
        if earlier[candidate] in BLOCKING:
            raise SubmissionRefused(
                f"refused: the same job and config was already submitted as {candidate} ({earlier[candidate]}); "
                f"see `ray job logs {candidate}`. Submitting again in this window would run it twice; "
                "pass --rerun to run it again anyway (committed shards are skipped)"
            )
        retry += 1
        candidate = f"{base}-retry{retry}"
    return candidate


def stage_working_dir(config_yaml: str, with_source: bool) -> Path:
    """A temporary folder to ship as the job's ``working_dir``: the config, and the code if asked."""
    stage = Path(tempfile.mkdtemp(prefix="latentshift-submit-"))
    (stage / SHIPPED_CONFIG).write_text(config_yaml)
    if with_source:
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".*-checkpoint")
        shutil.copytree(PROJECT_ROOT / "pipeline", stage / "pipeline", ignore=skip)
        shutil.copytree(PROJECT_ROOT / "jobs", stage / "jobs", ignore=skip)
    return stage


def running_from_checkout() -> bool:
    return (PROJECT_ROOT / "jobs").is_dir() and (PROJECT_ROOT / "pyproject.toml").is_file()


def submit(
    config_path: str,
    overrides: list[str],
    job: str = "translate",
    address: str | None = None,
    wait: bool = False,
    ship_source: bool | None = None,
    window_minutes: int = 60,
    rerun: bool = False,
    out=sys.stdout,
) -> int:
    """Submit; with ``wait``, stream the logs and return 0 only if the job SUCCEEDED."""
    from pipeline.config import load_config
    from pipeline.jobs import get

    command = get(job).command  # its command line under `python -m pipeline.cli`, as jobs/<job>.py runs it
    cfg = load_config(config_path, overrides)  # a bad config is refused here, before the cluster sees it
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise LatentshiftError("no cluster to submit to: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    client = _client(address)
    digest = cfg.config_hash()
    base = submission_id(job, digest, time.time(), window_minutes)
    if rerun:
        base = f"{base}-rerun{int(time.time())}"
    earlier = {j.submission_id: str(j.status) for j in client.list_jobs()
               if j.submission_id and j.submission_id.startswith(base)}
    job_id = next_free_id(base, earlier)

    with_source = running_from_checkout() if ship_source is None else ship_source
    stage = stage_working_dir(cfg.to_yaml(), with_source)
    entrypoint = " ".join(["python", "-m", "pipeline.cli", *command, "--config", SHIPPED_CONFIG])
    try:
        _submit_when_ready(client, entrypoint=entrypoint, submission_id=job_id,
                           runtime_env={"working_dir": str(stage)},
                           metadata={"latentshift_job": job, "config_hash": digest})
    except RuntimeError as exc:
        if "already exists" in str(exc):  # a concurrent twin won the race for this id
            raise SubmissionRefused(f"refused: submission {job_id} already exists (submitted concurrently)") from None
        raise LatentshiftError(f"submitting to {address} failed: {exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    out.write(f"submitted {job_id} to {address} ({job}, config {digest}, code from "
              f"{'this checkout' if with_source else 'the cluster image'})\n")
    out.flush()
    if not wait:
        out.write(f"  follow: ray job logs --address {address} --follow {job_id}\n")
        return 0
    return follow(client, job_id, out)


def _submit_when_ready(client, timeout_s: float = 90.0, **job) -> None:
    """A freshly started head answers HTTP before its job agent is up ("No available agent"): wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow(client, job_id: str, out=sys.stdout) -> int:
    """Stream a job's logs until it ends; 0 if it SUCCEEDED, 1 otherwise (with the job's message)."""

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        out.write(f"\nstopped following; the job goes on (ray job stop {job_id} stops it)\n")
        return 130
    status = _wait_terminal(client, job_id)
    if status == "SUCCEEDED":
        out.write(f"{job_id}: SUCCEEDED\n")
        return 0
    info = client.get_job_info(job_id)
    out.write(f"{job_id}: {status}: {info.message or 'no message'}\n")
    return 1


def _wait_terminal(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The log stream can close a moment before the status turns terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))  # JobStatus is a str enum: "SUCCEEDED", …
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - one clear line
        if "Authentication" in type(exc).__name__ or "authentication token" in str(exc):
            raise LatentshiftError(
                f"the Ray cluster at {address} requires its authentication token and this client has none or a "
                "different one: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file "
                "holding it); on the head, `ray get-auth-token` prints it"
            ) from None
        raise LatentshiftError(
            f"cannot reach a Ray cluster at {address} ({type(exc).__name__}); is the head running "
            "(`ray start --head` or a RayCluster) and its dashboard port (8265) reachable?"
        ) from None
