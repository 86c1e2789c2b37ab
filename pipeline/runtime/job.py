"""What a job is, to the runtime: a ``Job`` (what it needs, how its rows are built, what it
commits, what it says, the ``SubRun``s it needs) and the ``Run`` it gets handed (config, output
store, ledger, run id).

A job module in ``pipeline/jobs/`` defines one ``JOB = Job(...)``; the registry in
``pipeline/jobs/__init__.py`` lists them; ``runtime.envelope.run_job`` runs any of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from pipeline.config import JobConfig
from pipeline.data.ledger import ShardLedger
from pipeline.data.outputs import OutputStore
from pipeline.data.rows import LatentMeta, Provenance
from pipeline.data.shards import ShardRef


@dataclass(frozen=True)
class Option:
    """An extra command-line flag of one job, passed to it as ``run.options[dest]``."""

    flag: str  # "--reference"
    help: str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass
class Run:
    """One run of one job: handed to the job's functions by the envelope."""

    job: Job
    cfg: JobConfig
    store: OutputStore
    ledger: ShardLedger
    options: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the job adds its own figures here
    state: dict[str, Any] = field(default_factory=dict)  # the job's scratch space between its hooks
    out: TextIO = sys.stdout  # where the summary goes
    finished: bool = False  # it ran to its end (finish, run record); False: it stopped early (``prepare``,
    # or another run doing its shards)

    @property
    def run_id(self) -> str:
        return self.ledger.run_id


@dataclass(frozen=True)
class Built:
    """What a job's ``build`` returns: the rows to write, and how to record them."""

    dataset: Any  # ray.data.Dataset of OUTPUT rows (pipeline.data.rows)
    provenance: Provenance
    on_partial: Callable[[bytes], None] | None = None  # receives PARTIAL rows (e.g. OOD fits)


def no_lines(summary: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class SubRun:
    """A run of its own that a job's run needs: set B of a direction fit, the in-domain fit of an
    OOD report. The envelope (``runtime.envelope``) runs it under the parent's output, in
    ``folder``, with its own ledger, claims and rejects, redoing every shard each time: its result
    is handed over in memory (the ``Run`` its hooks filled, e.g. with the PARTIAL rows merged by
    ``Built.on_partial``), so a shard it skipped as committed would hand over nothing.

    A sub-run with ``redo=False`` is a run of its job like any other over the output, only started by
    the parent: committed shards are skipped, shards another run does now are left to it, and nothing
    is handed over in memory (``output.gallery``: the gallery of what the parent wrote, ``after="record"``).
    """

    folder: str  # under the parent's output.uri: "examples", "report/reference"; "": the parent's output itself
    # its config: gets a copy of the parent's with output.uri set to the folder, edits and returns it;
    # None: this run needs no such sub-run (no --reference, a learned fit). The files it reads are
    # best checked by the parent's ``check`` (direction fit lists hspace.examples there), so that they
    # fail before the parent's own walk; the sub-run's job has the preflight of any run besides
    config: Callable[[Run, JobConfig], JobConfig | None]
    hand_over: Callable[[Run, Run], None]  # (parent, the finished sub-run): the parent takes its result
    job: Job | None = None  # the job it runs; None: the parent's own
    # "commits": after the parent's commits, before its finish (the finish uses the result);
    # "finish": after the parent's finish (the result adds to what the finish wrote);
    # "record": after the parent's run record and summary (a run that takes nothing from it: redo=False)
    after: Literal["commits", "finish", "record"] = "commits"
    redo: bool = True  # every shard, each time (a result handed over); False: a run of its own (see above)


@dataclass(frozen=True)
class Job:
    name: str  # registry key, `submit --job`, the k8s job label: "translate", "ood-fit"
    command: tuple[str, ...]  # its CLI words: ("translate",), ("ood", "fit")
    help: str
    requires: tuple[str, ...]  # config keys it needs, checked first: "input.uri", "source.model"
    units: Callable[[JobConfig], list[ShardRef]]  # its shards (preflight: lists inputs, no model)
    build: Callable[[Run, list[ShardRef]], Built]  # the Ray dataset of rows for the shards to do
    commits: tuple[str, ...] = ("images", "latents", "rejects")  # what it writes under output.uri (a re-commit
    # removes its images/latents/scores/rejects files that the new commit does not write)
    summary: Callable[[dict], list[str]] = no_lines  # its own lines under the common summary
    skip_committed: bool = True  # False: every shard, every run (a fit covers all of its input)
    # shard claims (pipeline/data/claims.py): each reader claims its shard as it starts, so runs
    # started together split the input; True: the driver claims them all before build (a job
    # with no per-shard reader). A job with skip_committed=False takes all its shards or none.
    claim_up_front: bool = False
    check: Callable[[JobConfig], None] | None = None  # more preflight (e.g. a stats file fits the config)
    prepare: Callable[[Run], dict | None] | None = None  # before any work; a dict returned ends the run
    finish: Callable[[Run], None] | None = None  # after the commits (e.g. write the stats file)
    options: tuple[Option, ...] = ()
    models: tuple[str, ...] = ()  # model sections it loads ("source", "target"): resolved in preflight
    control: str = ""  # a job adding to another's output keeps its ledger, claims and rejects under this folder
    subruns: tuple[SubRun, ...] = ()  # runs of their own it needs, run by the envelope (see SubRun)


# ---- helpers job modules share ------------------------------------------------------


def image_shards(uri, storage_options: dict) -> list[ShardRef]:
    """The tar shards under ``uri``; none is an error naming the fix."""
    from pipeline.data.shards import list_shards
    from pipeline.errors import StorageError

    shards = list_shards(uri, storage_options)
    if not shards:
        raise StorageError(f"{uri}: no .tar shards found; check input.uri (pack images with `latentshift shards pack`)")
    return shards


def committed_image_shards(cfg: JobConfig) -> list[ShardRef]:
    """The output's committed image shards (``images/<shard>.tar`` with a ``_ledger/<shard>.json`` record; a
    shard without its record is not finished): what score and eval judge. None is an error naming the fix."""
    from pipeline.data.shards import list_shards
    from pipeline.errors import StorageError

    images = cfg.output.uri.rstrip("/") + "/images/"
    listed = list_shards(images, cfg.output.storage_options)  # a bad bucket or credentials: one clear line
    committed = OutputStore(cfg.output.uri, cfg.output.storage_options).committed() if listed else set()
    shards = [s for s in listed if s.name in committed]
    if not shards:
        raise StorageError(f"{cfg.output.uri}: no committed image shards (images/<shard>.tar with a "
                           "_ledger/<shard>.json record); run translate (or another job that writes images) first")
    return shards


def provenance(run: Run, settings: dict, latents: LatentMeta | None = None) -> Provenance:
    """The run's constants every output sample records, with the settings the job names."""
    from importlib.metadata import version

    return Provenance(job=run.job.name, config_hash=run.cfg.config_hash(), latentshift=version("latentshift"),
                      settings=settings, latents=latents)


def sampler_settings(cfg: JobConfig) -> dict:
    from pipeline.diffusion.noise import GENERATOR

    s = cfg.sampler
    return {"method": s.method, "steps": s.steps, "eta": s.eta, "strength": s.strength,
            "refine_steps": s.refine_steps, "seed": s.seed, "clip_x0": s.clip_x0, "noise": GENERATOR}


def source_latents(cfg: JobConfig, method: str | None = None) -> LatentMeta:
    """How latents of the source model are recorded (method and η of the sampler unless given)."""
    method = method or cfg.sampler.method
    return LatentMeta(model=cfg.source.model, method=method, eta=cfg.sampler.eta if method == "dpm" else 0.0,
                      cond=cfg.source.condition)
