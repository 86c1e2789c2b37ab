"""The job registry: every job latentshift runs, by name.

The CLI, ``latentshift submit``, the ``jobs/*.py`` entrypoints and the k8s manifests' tests all
read this table. A job is one module here defining ``JOB = Job(...)`` (pipeline.runtime.job),
plus one entry below; ``run_job`` runs any of them through the one run envelope.
"""

from __future__ import annotations

import sys

from pipeline.errors import ConfigError
from pipeline.jobs import (
    decode,
    direction_fit,
    edit,
    encode,
    evaluate,
    gallery,
    guide,
    ood_fit,
    ood_sample,
    score,
    search,
    translate,
)
from pipeline.runtime.job import Job

JOBS: dict[str, Job] = {j.name: j for j in (translate.JOB, encode.JOB, decode.JOB, ood_fit.JOB, ood_sample.JOB,
                                           direction_fit.JOB, edit.JOB, search.JOB, score.JOB, guide.JOB,
                                           evaluate.JOB, gallery.JOB)}


def get(name: str) -> Job:
    if name not in JOBS:
        raise ConfigError(f"unknown job {name!r}; one of {', '.join(JOBS)}")
    return JOBS[name]


def run_job(cfg, name: str, overwrite: bool = False, out=sys.stdout, **options) -> dict:
    """Run the job called ``name`` (see JOBS) with ``cfg``; returns its summary."""
    from pipeline.runtime.envelope import run_job as run

    return run(get(name), cfg, overwrite=overwrite, out=out, **options)
