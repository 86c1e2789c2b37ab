"""Preflight helpers the jobs' ``check`` functions share: what a job will read, checked before Ray
starts, and the one-line warnings for settings that are legitimate but easy to get wrong."""

from __future__ import annotations

import logging

from pipeline.config import ClipConfig, ModelConfig, ScoreConfig
from pipeline.errors import ConfigError

log = logging.getLogger("latentshift.preflight")


def warn(message: str) -> None:
    """One line on the console (the CLI logs to stderr), never an error: the run goes on."""
    log.warning(" ".join(message.split()))


def source_folder(cfg):
    """``source.model`` resolved and checked as ``check_models`` will (a remote one is fetched into the
    model cache once, which the actors and check_models then reuse)."""
    from pipeline.data.model_store import resolve_model

    s = cfg.source
    return resolve_model(s.model, s.storage_options, allow_pickle=s.allow_pickle)


def require_text_model(cfg, why: str) -> None:
    """``source.model`` is a text-conditional model (a UNet2DConditionModel with its text encoder)."""
    from pipeline.data.model_store import unet_conditioning

    kind = unet_conditioning(source_folder(cfg))
    if kind != "text":
        what = {"class": "class-conditional", "none": "unconditional"}[kind]
        raise ConfigError(f"config error: source.model {cfg.source.model!r} is {what}; {why}: give a text-conditional "
                          "model (a UNet2DConditionModel with text_encoder/, e.g. Stable Diffusion)")


def edited_steps(t_edit: int, grid: list[int]) -> list[int]:
    """The timesteps of ``grid`` at which an h-space edit applies Δh (``edit_walk``: t ≥ t_edit)."""
    return [t for t in grid if t >= t_edit]


def check_t_edit_in_grid(t_edit: int, grid: list[int], origin: str = "") -> None:
    """Refused, not warned: an edit whose t_edit lies above every timestep it walks applies Δh nowhere, so every
    scaleN image equals the unedited one (exit 0 and nothing done is never what an edit asks for)."""
    if not edited_steps(t_edit, grid):
        raise ConfigError(f"config error: hspace.t_edit = {t_edit}{origin} is above every timestep the walk takes "
                          f"(t0 {grid[0]} down to {grid[-1]}, hspace.t0 / hspace.steps / hspace.grid), so no step "
                          f"would be edited; set hspace.t_edit to at most {grid[0]}, or raise hspace.t0")


def check_condition_fits(cfg, folder) -> None:
    """``source.condition`` is of the kind ``source.model`` takes: a prompt or class index given to an
    unconditional model, or a prompt to a class model, would end on the actor in a raw ValueError."""
    from pipeline.data.model_store import unet_conditioning

    condition, kind = cfg.source.condition, unet_conditioning(folder)
    if kind == "none" and condition is not None:
        raise ConfigError(f"config error: source.condition = {condition!r}, but source.model {cfg.source.model!r} is "
                          "unconditional; set source.condition: null, or give a conditional model")
    if kind == "class" and isinstance(condition, str):
        raise ConfigError(f"config error: source.condition = {condition!r} is a prompt, but source.model "
                          f"{cfg.source.model!r} is class-conditional; give a class index (or null with "
                          "source.null_class)")


def check_scoring(clip: ClipConfig, score: ScoreConfig, source: ModelConfig, target: ModelConfig,
                  directional: bool = True) -> None:
    """CLIP scores (score, translate's score.inline, the search's ranking): the texts resolve and the
    checkpoint passes ``check_clip_checkpoint``."""
    from pipeline.metrics.scorer import score_texts

    score_texts(score, source, target, directional)  # the cheap check first: no file is read for a missing text
    check_clip_checkpoint(clip, "CLIP scores need")


def check_clip_checkpoint(clip: ClipConfig, who: str) -> None:
    """The ``clip`` section, through the checks the actor's load applies: ``clip.pretrained`` is set
    and readable (an s3:// one is fetched into the model cache now, which the actors then reuse),
    safetensors (or a pickle with ``clip.allow_pickle``) whose header and tensor extents are sound, and
    its shapes fit ``clip.model`` built on the meta device. No tensor is read. ``who`` says what needs
    the checkpoint ("CLIP scores need")."""
    from pipeline.data.model_cache import materialize_file
    from pipeline.errors import StorageError
    from pipeline.metrics.clip import check_clip_files

    if not (clip.pretrained or "").strip():
        raise ConfigError(f"config error: clip.pretrained is not set; {who} a local or s3:// open_clip "
                          "checkpoint (.safetensors; latentshift never downloads one)")
    try:
        path = materialize_file(clip.pretrained, clip.storage_options)
    except StorageError as exc:
        raise ConfigError(f"config error: clip.pretrained {clip.pretrained!r}: {_without_uri(str(exc), clip.pretrained)}"
                          ) from None
    check_clip_files(clip.model, path, allow_pickle=clip.allow_pickle, shown=clip.pretrained)


def _without_uri(message: str, uri: str) -> str:
    """A storage error's text without its leading ``URI:`` (the caller names the URI with its key)."""
    return message.removeprefix(f"{uri}:").strip() or message
