"""The models a job loads: resolved and checked before Ray starts; a load that still fails on an
actor, or an error a user can act on raised there, turned into one line."""

from __future__ import annotations

import re

from pipeline.config import JobConfig
from pipeline.errors import LatentshiftError, ModelLoadError
from pipeline.runtime.job import Job


def check_models(job: Job, cfg: JobConfig) -> None:
    """Resolve every model the job loads (existence, layout, pickle policy) and check that its
    weights fit its configs, before Ray starts.

    ``resolve_model`` reads JSON and lists files only (a remote folder is fetched into the
    model cache, which the actors then reuse); ``check_weights_fit`` builds the networks on the
    meta device and reads safetensors headers only. A bad model fails here with one line.
    """
    from pipeline.data.model_store import resolve_model
    from pipeline.diffusion.denoiser import check_weights_fit

    seen = set()
    for name in job.models:
        section = getattr(cfg, name)
        key = (section.model, section.allow_pickle)
        if key in seen:
            continue
        seen.add(key)
        folder = resolve_model(section.model, section.storage_options, allow_pickle=section.allow_pickle)
        check_weights_fit(folder)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def actor_failure(exc: BaseException, job: Job, cfg: JobConfig) -> LatentshiftError | None:
    """The one-line error for what went wrong on an actor: a ``LatentshiftError`` raised there (a
    model that does not load, one sample that does not fit in GPU memory), or a model stage's
    actor that died in ``__init__`` (a model that passed ``check_models`` and still failed to
    load, e.g. corrupt weights); None for any other error.

    Ray Data gives up on the first actor that dies during initialisation (``init_ray`` pins
    ``max_consecutive_actor_init_deaths = 0``) and raises Ray's ``ActorDiedError``, whose text
    holds the worker's traceback; the last ``...Error: message`` line of it is the reason.
    """
    import ray.exceptions

    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:  # e.g. a ModelLoadError that came back through Ray as RayTaskError(ModelLoadError)
        if isinstance(e, LatentshiftError):
            original = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayError) else e
            if isinstance(original, LatentshiftError):
                return type(original)(_one_line(str(original)))
            kind = ModelLoadError if isinstance(e, ModelLoadError) else LatentshiftError
            return kind(_one_line(_last_error_line(str(e)) or str(e)))
    died = next((e for e in chain if isinstance(e, ray.exceptions.RayActorError)
                 and "creation task" in str(e)), None)
    if died is None:
        return None
    text = str(died)
    reason = _last_error_line(text) or "the actor died while loading it (see the Ray logs)"
    models = ", ".join(dict.fromkeys(getattr(cfg, m).model for m in job.models)) or "its model"
    if "ModelLoadError" in text and reason.startswith("model "):
        return ModelLoadError(_one_line(f"{reason} (on a Ray actor)"))
    return ModelLoadError(_one_line(f"model {models}: failed to load on a Ray actor: {reason}"))


def _last_error_line(text: str) -> str | None:
    found = None
    for line in _ANSI.sub("", text).splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m:
            found = m.group(2) if m.group(1) in ("ModelLoadError", "LatentshiftError") else f"{m.group(1)}: {m.group(2)}"
    return found


def _one_line(text: str) -> str:
    return " ".join(_ANSI.sub("", text).split())
