"""Ray for the runtime: connect, size the actor pool, and the stages every job starts with.

  read_images(run, shards)        one read task per shard → decode/validate/resize (CPU tasks)
  read_latent_files(run, shards)  one read task per latent Parquet file
  model_stage(ds, runtime, Stage, **sections)   an actor pool (or Ray tasks), models loaded once per process
"""

from __future__ import annotations

import logging
import os
import re
import uuid

from pipeline.config import RuntimeConfig
from pipeline.data.shards import ShardRef
from pipeline.errors import ConfigError

_show_traces = False  # --verbose: Ray's console output as Ray prints it


def show_traces(on: bool) -> None:
    """``--verbose``: leave Ray's console output alone (worker tracebacks, Ray Data's error log)."""
    global _show_traces
    _show_traces = on


def verbose() -> bool:
    """``--verbose`` was given."""
    return _show_traces


def init_ray() -> None:
    """Connect to $RAY_ADDRESS (a cluster), or start a local Ray (also when it says ``local``)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        if address in (None, "local") and not _show_traces:
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthOnNotice())
        ray.init(address=address, log_to_driver=True, configure_logging=False,
                 include_dashboard=False if address in (None, "local") else None)
        if address in (None, "local"):
            warm_workers()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Ray's progress bars in a terminal; elsewhere (a pod, CI, nohup) they become hundreds of log lines,
    # so they are off and the driver prints its own progress line (runtime/progress.py); --verbose: Ray's
    ctx.enable_progress_bars = _show_traces or interactive()
    # A model stage's actor that raises in __init__ (a model that passed preflight and still does
    # not load) fails the run at once: no in-actor retries, no replacement actors. Ray Data then
    # raises the actor's ActorDiedError, which run_job turns into one line (runtime/models.py: actor_failure).
    ctx.actor_init_retry_on_errors = False
    ctx.max_consecutive_actor_init_deaths = 0
    _keep_traces_in_log_files()


WARM_WORKERS = 2  # at most: a warm process holds ~0.8 GB resident (measured), and a stage runs in one or two


def warm_workers() -> None:
    """One task per CPU of a local Ray (at most ``WARM_WORKERS``) that imports what a model stage needs
    (torch, diffusers' UNets, the stages), not waited for: the worker processes Ray keeps for tasks do it
    while the driver runs preflight and lists its inputs, so the first run's stage tasks (``runtime.pool``
    tasks) find them ready instead of paying the imports one after the other (5 s each on a 2-core CPU)."""
    import ray

    warm = ray.remote(num_cpus=1)(_import_stage_modules)
    for _ in range(min(WARM_WORKERS, int(ray.cluster_resources().get("CPU", 1)))):
        warm.remote()


def _import_stage_modules() -> None:
    import diffusers.models.unets.unet_2d  # noqa: F401
    import diffusers.models.unets.unet_2d_condition  # noqa: F401

    import pipeline.stages.base  # noqa: F401


class _TokenAuthOnNotice(logging.Filter):
    """Ray's notice, on every start of a local Ray, that token authentication is on (its default): not
    printed but with ``--verbose``. Its warning that authentication is off still is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled")


class _HideRayDataErrorLog(logging.Filter):
    """Ray Data logs a failed execution (an actor that died in __init__, a UDF that raised) as an
    error with a stack; the CLI reports the failure in one line, so the record goes to Ray Data's
    log file only (its console handler drops records marked ``hide``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _show_traces:
            record.hide = True
        return True


_TRACE_START = re.compile(r"Traceback \(most recent call last\)|Exception raised in creation task|"
                          r"During handling of the above exception|The above exception was the direct cause")
_CRASH_START = re.compile(r"Stack trace:|\*\*\* SIG\w+ received|Fatal Python error|"
                          r"Stack \(most recent call first\)")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b")


class _ForwardedTraceFilter:
    """Worker output forwarded to the console (``log_to_driver``) without tracebacks: a Python
    traceback is dropped from its first line to its exception line, a dying worker's crash dump
    (Ray's C++ stack, ``*** SIGABRT``, ``Fatal Python error``) with everything after it from that
    worker, and a raylet message that carries a traceback whole. Other lines pass."""

    def __init__(self):
        self.in_traceback: set = set()
        self.crashed: set = set()

    def keep(self, data: dict) -> list[str]:
        lines = data.get("lines", [])
        if data.get("pid") == "raylet":
            return [line for line in lines if "Traceback (most recent call last)" not in line]
        worker = (data.get("ip"), data.get("pid"))
        kept = []
        for line in lines:
            if worker in self.crashed:
                break
            if _CRASH_START.search(line):
                self.crashed.add(worker)
                break
            if _TRACE_START.search(line):
                self.in_traceback.add(worker)
            elif worker in self.in_traceback:
                if _EXCEPTION_LINE.match(line):
                    self.in_traceback.discard(worker)
            elif line.strip():  # a blank line often opens a dump: alone it says nothing
                kept.append(line)
        return kept


def interactive() -> bool:
    """A person at a terminal: stderr is a TTY."""
    import sys

    return sys.stderr.isatty()


class _RayDataConsoleQuiet(logging.Filter):
    """On Ray Data's console handler: its INFO lines (each dataset's start, plan and end) stay in its log
    file unless ``--verbose`` or a terminal; its warnings and errors still reach the console, but for its
    line about a failed task, which the CLI reports in one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _show_traces or not record.name.startswith("ray.data"):
            return True
        if str(record.msg).startswith("An exception was raised from a task of operator"):
            return False  # a failed task (runtime.pool tasks): the CLI says what failed, in one line
        if interactive():
            return True
        # the bars are off on purpose here (init_ray): its warning about it says nothing to the reader
        return record.levelno >= logging.WARNING and not str(record.msg).startswith("Progress bars disabled")


def _keep_traces_in_log_files() -> None:
    """Unless ``--verbose``: no traceback from Ray on the console; Ray's log files keep them all
    (``/tmp/ray/session_*/logs``: the workers' output, Ray Data's ``ray-data`` log)."""
    logger = logging.getLogger("ray.data.exceptions")
    if not any(isinstance(f, _HideRayDataErrorLog) for f in logger.filters):
        logger.addFilter(_HideRayDataErrorLog())
    for handler in logging.getLogger("ray.data").handlers:  # its console handler only (its file keeps them all)
        if type(handler).__name__ == "PlainRayHandler" and not any(
                isinstance(f, _RayDataConsoleQuiet) for f in handler.filters):
            handler.addFilter(_RayDataConsoleQuiet())
    try:
        # Ray prints worker output and raylet error messages through this one function; it is
        # private, so a Ray without it prints them unfiltered rather than failing the run.
        import ray._private.worker as ray_worker

        printer = ray_worker.print_worker_logs
    except (ImportError, AttributeError):
        return
    if getattr(printer, "latentshift_filter", None) is not None:
        return
    trace_filter = _ForwardedTraceFilter()

    def print_worker_logs(data, print_file, ignore_prefix=False):
        if _show_traces:
            return printer(data, print_file, ignore_prefix)
        kept = trace_filter.keep(data)
        if kept:
            printer({**data, "lines": kept}, print_file, ignore_prefix)

    print_worker_logs.latentshift_filter = trace_filter
    ray_worker.print_worker_logs = print_worker_logs


def gpus_per_actor(runtime: RuntimeConfig) -> float:
    """``auto``: $LATENTSHIFT_GPUS_PER_ACTOR if set, else 1 if the cluster has GPUs now, else 0.

    A cluster whose GPU workers scale from zero shows no GPU when the job starts, so its head
    sets the variable (k8s/base does) and the actors' GPU requests make the autoscaler add them.
    """
    import ray

    if runtime.gpus_per_actor != "auto":
        return float(runtime.gpus_per_actor)
    declared = os.environ.get("LATENTSHIFT_GPUS_PER_ACTOR", "").strip()
    if declared:
        try:
            return max(0.0, float(declared))
        except ValueError:
            raise ConfigError(f"LATENTSHIFT_GPUS_PER_ACTOR = {declared!r}: expected a number such as 1 or 0.5") from None
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _per_shard(shards: list[ShardRef]):
    import ray.data

    return ray.data.from_items([{"uri": s.uri, "name": s.name} for s in shards], override_num_blocks=len(shards))


def read_images(run, shards: list[ShardRef]):
    """INPUT rows of every shard (rejects included), then PIXEL rows of the image size."""
    from pipeline.stages.images import decode_images
    from pipeline.stages.read import read_shard

    cfg = run.cfg
    ds = _per_shard(shards).flat_map(read_shard, fn_kwargs={"storage_options": cfg.input.storage_options,
                                                            "ledger": run.ledger, "carry": cfg.input.carry})
    return ds.map_batches(decode_images, batch_format="numpy", batch_size=cfg.runtime.batch_size,
                          fn_kwargs={"size": cfg.image.size, "resize": cfg.image.resize,
                                     "max_pixels": cfg.image.max_pixels,
                                     "exif_transpose": cfg.image.exif_transpose})


def read_latent_files(run, shards: list[ShardRef]):
    """LATENT_INPUT rows: one per stored sample of every latent file."""
    from pipeline.stages.read import read_latent_file

    return _per_shard(shards).flat_map(read_latent_file, fn_kwargs={"storage_options": run.cfg.input.storage_options,
                                                                     "ledger": run.ledger})


def model_stage(ds, runtime: RuntimeConfig, stage_cls, **sections):
    """An actor pool (``runtime.actors``), ``num_gpus`` per actor, fixed-size batches; ``sections``
    are the config sections the stage's constructor takes. Or, ``runtime.pool`` tasks (``uses_tasks``),
    at most ``runtime.actors`` Ray tasks at a time, each worker process keeping its stage
    (pipeline/stages/base.py: stage_in_process).

    A stage with ``concurrent_batches`` 2 runs two batches per actor in threads, its device lock
    letting one compute at a time (pipeline/stages/base.py): the host work of one overlaps the
    device work of the next.
    """
    import ray.data

    actors = runtime.actors
    gpus = gpus_per_actor(runtime)
    kwargs = {"dtype": runtime.dtype, "compile": runtime.compile, **sections}
    if uses_tasks(runtime, gpus):
        from pipeline.stages.base import stage_in_process

        most = actors[1] if isinstance(actors, list) else actors
        return ds.map_batches(stage_in_process, batch_format="numpy", batch_size=runtime.batch_size,
                              compute=ray.data.TaskPoolStrategy(size=most), num_gpus=gpus, num_cpus=0 if gpus else 1,
                              fn_kwargs={"stage_cls": stage_cls, "sections": kwargs, "tasks": most,
                                         "key": f"{stage_cls.__qualname__}-{uuid.uuid4().hex}"})  # this run's
    size = {"min_size": actors[0], "max_size": actors[1]} if isinstance(actors, list) else {"size": actors}
    calls = stage_cls.concurrent_batches
    pool = ray.data.ActorPoolStrategy(**size, max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=calls > 1)
    return ds.map_batches(stage_cls, batch_format="numpy", batch_size=runtime.batch_size, compute=pool,
                          num_gpus=gpus, num_cpus=0 if gpus else 1, fn_constructor_kwargs=kwargs)


def uses_tasks(runtime: RuntimeConfig, gpus: float) -> bool:
    """``runtime.pool``: ``auto`` is tasks on a one-node Ray whose model stages take no GPU.

    An actor lives for one run: each run starts a process, imports torch and diffusers and loads its
    models before the first batch (5-8 s on a 2-core CPU, longer than a small run's work). A Ray task
    worker outlives the run, so a laptop's or CI's runs after the first find it ready. On a cluster
    or a GPU the actor pool stays: its size bounds the model copies and their device memory.
    """
    import ray

    if runtime.pool != "auto":
        return runtime.pool == "tasks"
    return gpus == 0 and sum(1 for node in ray.nodes() if node.get("Alive")) == 1
