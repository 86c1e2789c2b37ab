"""The driver's progress line (pipeline/runtime/progress.py) and the quiet console (runtime/ray_env.py)."""

from __future__ import annotations

import io
import logging

import pytest

import pipeline.runtime.ray_env as ray_env
from pipeline.runtime.progress import Progress

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_one_line_every_n_seconds_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(ray_env, "interactive", lambda: False)
    clock, out = Clock(), io.StringIO()
    p = Progress("translate", 4, out, every=10, clock=clock)
    p.add(samples=8)
    assert out.getvalue() == ""  # nothing before the first interval
    clock.t += 10
    p.add(samples=12, rejected=1, shards=1)
    clock.t += 5
    p.add(samples=5)  # within the interval: no line
    lines = out.getvalue().splitlines()
    assert lines == ["latentshift translate  1/4 shards, 20 samples (2.0/s), 1 rejected, ETA 30s"]
    clock.t += 200
    p.add(shards=2)
    assert out.getvalue().splitlines()[-1] == ("latentshift translate  3/4 shards, 25 samples (0.1/s), 1 rejected, "
                                               "ETA 1m12s")


def test_silent_in_a_terminal_or_when_turned_off(monkeypatch):
    clock, out = Clock(), io.StringIO()
    monkeypatch.setattr(ray_env, "interactive", lambda: True)
    p = Progress("eval", 2, out, every=1, clock=clock)
    clock.t += 5
    p.add(samples=3)
    monkeypatch.setattr(ray_env, "interactive", lambda: False)
    monkeypatch.setenv("LATENTSHIFT_PROGRESS_SECONDS", "0")
    q = Progress("eval", 2, out, clock=clock)
    clock.t += 5
    q.add(samples=3)
    assert out.getvalue() == ""


def test_ray_data_info_stays_off_the_console_but_warnings_pass(monkeypatch):
    monkeypatch.setattr(ray_env, "interactive", lambda: False)
    quiet = ray_env._RayDataConsoleQuiet()
    info = logging.LogRecord("ray.data._internal.execution", logging.INFO, "x", 1, "Starting execution", None, None)
    warning = logging.LogRecord("ray.data", logging.WARNING, "x", 1, "slow", None, None)
    assert not quiet.filter(info) and quiet.filter(warning)
    bars = logging.LogRecord("ray.data", logging.WARNING, "x", 1, "Progress bars disabled. To enable, …", None, None)
    assert not quiet.filter(bars)  # turned off on purpose: its warning says nothing
    other = logging.LogRecord("pipeline.jobs.ood_fit", logging.INFO, "x", 1, "snapped", None, None)
    assert quiet.filter(other)  # only Ray Data's own lines: a handler it lands on by mistake loses nothing else
    ray_env.show_traces(True)
    try:
        assert quiet.filter(info)  # --verbose: Ray's lines as Ray prints them
    finally:
        ray_env.show_traces(False)


def test_the_filter_goes_on_ray_datas_console_handler_only():
    """Ray Data's console handler gets it; any other handler on the logger (a user's, pytest's) does not."""
    import ray.data  # noqa: F401 - configures Ray Data's logging

    logger = logging.getLogger("ray.data")
    extra = logging.StreamHandler(io.StringIO())
    logger.addHandler(extra)
    try:
        ray_env._keep_traces_in_log_files()
        console = [h for h in logger.handlers if type(h).__name__ == "PlainRayHandler"]
        assert console and all(any(isinstance(f, ray_env._RayDataConsoleQuiet) for f in h.filters) for h in console)
        assert not extra.filters
    finally:
        logger.removeHandler(extra)


def test_a_failed_task_line_and_the_token_auth_notice_stay_off_the_console(monkeypatch):
    """Ray Data's line about a failed task (the CLI says what failed in one line of its own), also in a
    terminal; Ray's notice that token authentication is on (its default) goes, its warning that it is off stays."""
    monkeypatch.setattr(ray_env, "interactive", lambda: True)
    failed = logging.LogRecord("ray.data._internal.execution.streaming_executor_state", logging.ERROR, "x", 1,
                               'An exception was raised from a task of operator "MapBatches(stage_in_process)".',
                               None, None)
    other_error = logging.LogRecord("ray.data", logging.ERROR, "x", 1, "object store full", None, None)
    quiet = ray_env._RayDataConsoleQuiet()
    assert not quiet.filter(failed) and quiet.filter(other_error)
    notice = ray_env._TokenAuthOnNotice()
    on = logging.LogRecord("ray", logging.WARNING, "x", 1, "Token authentication is enabled for this Ray cluster.",
                           None, None)
    off = logging.LogRecord("ray", logging.WARNING, "x", 1, "Token authentication is disabled for this Ray cluster.",
                            None, None)
    assert not notice.filter(on) and notice.filter(off)
