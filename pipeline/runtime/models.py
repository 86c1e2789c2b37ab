"""The models a job loads: resolved and checked before Ray starts; a load that still fails on an
actor, or an error a user can act on raised there, turned into one line."""

from __future__ import annotations

import re

from pipeline.config import JobConfig
from pipeline.errors import LatentshiftError
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
    file a config key names that does not load, ``pipeline.stages.base.loading``; one sample that
    does not fit in GPU memory), also when it killed the actor in ``__init__``; None for any
    other error (a bug: the CLI prints it in one line too, ``root_reason``, exit 1).

    Ray Data gives up on the first actor that dies during initialisation (``init_ray`` pins
    ``max_consecutive_actor_init_deaths = 0``) and raises Ray's ``ActorDiedError``, whose text
    holds the worker's traceback; the last ``...Error: message`` line of it is the reason. A stage
    in Ray tasks (``runtime.pool``) fails its task, whose ``RayTaskError`` text holds it the same way.
    """
    import ray.exceptions

    chain = _chain(exc)
    for e in chain:  # e.g. a ModelLoadError that came back through Ray as RayTaskError(ModelLoadError)
        original = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayError) else e
        if isinstance(original, LatentshiftError):
            return type(original)(_one_line(str(original)))
        if isinstance(e, LatentshiftError):
            found = _last_error_line(str(e))
            kind = _error_class(found[0]) if found else None
            return (kind or LatentshiftError)(_one_line(found[1] if found else str(e)))
    died = next((e for e in chain if isinstance(e, ray.exceptions.RayActorError)
                 and "creation task" in str(e)), None)
    if died is None:  # a stage in Ray tasks (runtime.pool): Ray Data keeps the worker's error as text only
        died = next((e for e in chain if isinstance(e, ray.exceptions.RayTaskError)), None)
    if died is None:
        return None
    found = _last_error_line(str(died), skip=_RAY_WRAPPERS)
    kind = _error_class(found[0]) if found else None
    if kind is None:
        return None  # not an error a user can act on: a bug in the stage's __init__
    return kind(_one_line(found[1]))


def root_reason(exc: BaseException) -> str:
    """What went wrong, in one line, for an error that is not a ``LatentshiftError`` (a bug): the
    original exception raised on a Ray worker when the error came from one (Ray Data's "UDF failed
    to process a data block", ``RayTaskError``, an actor that died), else ``Type: message``."""
    import ray.exceptions

    chain = _chain(exc)
    on_ray = any(isinstance(e, ray.exceptions.RayError) or type(e).__module__.startswith("ray.")
                 for e in chain)
    where = " (on a Ray worker)" if on_ray else ""
    for e in reversed(chain):  # Ray's text holds the worker's traceback: its last error not Ray's own
        found = _last_error_line(str(e), skip=_RAY_WRAPPERS) if "\n" in str(e) else None
        if found:
            return _one_line(f"{found[0]}: {found[1]}") + where
    for e in reversed(chain):
        cause = getattr(e, "cause", None)  # RayTaskError: the exception object raised on the worker
        if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray."):
            return _one_line(f"{type(cause).__name__}: {cause}") + where
    deepest = chain[-1]
    return _one_line(f"{type(deepest).__name__}: {deepest}" if str(deepest) else type(deepest).__name__) + where


def _chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _error_class(name: str) -> type[LatentshiftError] | None:
    """``FileLoadError`` → the class, for any error of ``pipeline.errors`` named in a worker's text."""
    import pipeline.errors

    cls = getattr(pipeline.errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, LatentshiftError) else None


# Ray's wrappers around the error raised on a worker (Ray Data's "UDF failed to process a data block")
_RAY_WRAPPERS = frozenset({"UserCodeException", "RayTaskError", "RayActorError", "ActorDiedError"})


def _last_error_line(text: str, skip: frozenset = frozenset()) -> tuple[str, str] | None:
    """(type name, message) of the last ``...Error: message`` line of a worker's traceback text,
    ignoring errors of the types named in ``skip``."""
    found = None
    for line in _ANSI.sub("", text).splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and m.group(1) not in skip:
            found = (m.group(1), m.group(2))
    return found


def _one_line(text: str) -> str:
    return " ".join(_ANSI.sub("", text).split())
