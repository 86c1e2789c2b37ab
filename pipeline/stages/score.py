"""CLIP scores on the device: the ``Scorer`` (shared by `latentshift score` and translate's
``score.inline``), the score job's pair reader and decoder (CPU tasks) and its ``ScoreStage`` (actor pool).

  CLIP score   cos(E(output), T(target text))
  directional  cos(normalise(E(output) − E(input)), normalise(T(target text) − T(source text)))

E: L2-normalised CLIP image features; T: L2-normalised features of the plain text (the official
CycleDiffusion ranking, ChenWu98/cycle-diffusion model/energy/clean_clip.py:19-41: ``clip_score``
line 38, ``dclip_score`` line 39), or with ``score.templates`` the mean over the ImageNet templates
(Asyrp's compute_text_direction, kwonminki/Asyrp_official losses/clip_loss.py:110-117).

The score job reads pairs: each committed output shard (``images/<shard>.tar``) with the input
shard of the same basename, paired by ``__key__``, both decoded to ``image.size`` in CPU tasks as
translate decoded its input, so re-scoring an output gives the numbers translate gave inline.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import ClipConfig, ModelConfig, ScoreConfig
from pipeline.data.images import RejectedImage, decode_image
from pipeline.data.ledger import ShardLedger
from pipeline.data.rows import SCORE_PIXEL_COLUMNS, SCORE_READ_COLUMNS, RowBuffer, RowKind
from pipeline.data.shards import (
    EMPTY_IMAGE,
    INPUT_IMAGE,
    TarDamage,
    clean_message,
    image_member,
    iter_tar_samples,
)
from pipeline.errors import ConfigError
from pipeline.metrics.clip import IMAGENET_TEMPLATES, clip_score, directional_similarity
from pipeline.stages.base import ModelStage, load_clip_section
from pipeline.stages.read import fetch_shard
from pipeline.stages.tensors import to_model_range

MAX_REASON = 2000  # characters, as the input reader cuts them


# ---- texts and preflight --------------------------------------------------------------------


def _prompt(condition) -> str | None:
    """A model section's condition when it is a prompt (a class index is no text)."""
    return (condition.strip() or None) if isinstance(condition, str) else None


def score_texts(score: ScoreConfig, source: ModelConfig, target: ModelConfig,
                directional: bool = True) -> tuple[str | None, str]:
    """(source text, target text): ``score.*_text``, else the model section's prompt condition.

    The target text is always needed (the CLIP score is against it); the source text only for the
    directional score. Missing ones are errors naming the key to set.
    """
    target_text = (score.target_text or "").strip() or _prompt(target.condition)
    if not target_text:
        raise ConfigError("config error: score.target_text is not set and target.condition is not a prompt; "
                          "CLIP scores need the text the outputs should match (e.g. score.target_text: 'a dog')")
    if not directional:
        return None, target_text
    source_text = (score.source_text or "").strip() or _prompt(source.condition)
    if not source_text:
        raise ConfigError("config error: score.source_text is not set and source.condition is not a prompt; "
                          "directional CLIP needs the text of the input images (e.g. score.source_text: 'a cat')")
    return source_text, target_text


def check_scoring(clip: ClipConfig, score: ScoreConfig, source: ModelConfig, target: ModelConfig,
                  directional: bool = True) -> None:
    """Preflight, before any model loads: the texts resolve and the checkpoint passes ``check_clip_checkpoint``."""
    score_texts(score, source, target, directional)  # the cheap check first: no file is read for a missing text
    check_clip_checkpoint(clip, "CLIP scores need")


def check_clip_checkpoint(clip: ClipConfig, who: str) -> None:
    """Preflight of the ``clip`` section, through the checks the actor's load applies: ``clip.pretrained``
    is set and readable (an s3:// one is fetched into the model cache now, which the actors then reuse),
    safetensors (or a pickle with ``clip.allow_pickle``) whose header and tensor extents are sound, and
    its shapes fit ``clip.model`` built on the meta device. No tensor is read."""
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


# ---- the scorer -----------------------------------------------------------------------------


class Scorer:
    """A frozen CLIP and the two texts' features, computed once (per actor); scores batches on its device."""

    def __init__(self, clip, source_text: str | None, target_text: str, templates: bool = False):
        self.clip = clip
        self.source_text, self.target_text = source_text, target_text
        tmpl = IMAGENET_TEMPLATES if templates else None
        # with templates, the mean of normalised per-template features, not renormalised, as Asyrp's
        # text direction (clip_loss.py:110-117); the CLIP score is a cosine, so its norm does not matter
        self.target = clip.text_features([target_text], tmpl, renormalize=False)
        self.source = clip.text_features([source_text], tmpl, renormalize=False) if source_text else None

    @classmethod
    def load(cls, clip: ClipConfig, score: ScoreConfig, source: ModelConfig, target: ModelConfig, device=None,
             directional: bool = True) -> Scorer:
        source_text, target_text = score_texts(score, source, target, directional)
        # float32 whatever runtime.dtype says: scores are measurements, kept comparable across runs and devices
        model = load_clip_section(clip, device if device is not None else "auto")
        return cls(model, source_text, target_text, score.templates)

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def _images(self, x) -> torch.Tensor:
        """uint8 (B, H, W, 3) (numpy or tensor) or float (B, 3, H, W) in [-1, 1] → [-1, 1] on the device."""
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:  # the bytes travel, a quarter of float32's; converted on the device
            return to_model_range(x.to(self.device, non_blocking=True))
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def score(self, outputs, inputs=None) -> tuple[np.ndarray, np.ndarray]:
        """(clip_score, directional), float32 (B,) each on the host; directional NaN without ``inputs``
        or without a source text. One CLIP forward for outputs and inputs together."""
        out = self._images(outputs)
        n = out.shape[0]
        pair = inputs is not None and self.source is not None
        both = torch.cat([out, self._images(inputs)]) if pair else out
        feats = self.clip.image_features(both)
        scores = clip_score(feats[:n], self.target)  # clean_clip.py:38
        if pair:  # clean_clip.py:33-36, 39 (image and text directions normalised)
            directional = directional_similarity(feats[n:], feats[:n], self.source, self.target)
        else:
            directional = torch.full_like(scores, math.nan)
        host = torch.stack([scores, directional]).float().cpu().numpy()  # one copy back
        return host[0].astype(np.float32), host[1].astype(np.float32)


# ---- the score job's rows: read pairs, decode them (CPU tasks) -------------------------------


def _listing(rows: RowBuffer) -> list[dict]:
    batch = rows.batch()
    return [{c: batch[c][i] for c in rows.columns} for i in range(len(rows))]


def _input_images(uri: str | None, shard: str, storage_options: dict) -> tuple[dict[str, tuple[str, bytes]], str]:
    """key → (member name, encoded image) of the input shard, and why a key may be missing from it.
    An empty image member is in it with its empty bytes: the reject says "empty image member", as
    read_shard's does, not that the key is missing."""
    if uri is None:
        return {}, f"no input shard {shard}.tar under input.uri"
    data, failure = fetch_shard(uri, storage_options)
    if data is None:  # every sample of the shard becomes a reject naming it
        return {}, f"cannot read input shard {uri}: {failure}"
    found: dict[str, tuple[str, bytes]] = {}
    why = f"not in input shard {uri}"
    for sample in iter_tar_samples(io.BytesIO(data)):
        if isinstance(sample, Exception):
            why = f"not in input shard {uri} (it is damaged: {clean_message(str(sample))})"
            break
        image = image_member(sample.members) if not sample.error else None
        if image is not None and sample.key not in found:  # the first occurrence, as read_shard keeps
            found[sample.key] = (sample.names[image[0]], image[1])
    return found, why


def read_pairs(item: dict, storage_options: dict, input_uris: dict[str, str] | None, input_storage_options: dict,
               ledger: ShardLedger) -> list[dict]:
    """One committed output shard (``item``: its images tar) → one row per sample: the output image,
    and with ``input_uris`` (directional CLIP) the input image of the same key from the input shard
    of the same basename. A sample without its input image is a REJECT naming the key and the shard."""
    shard, uri = item["name"], item["uri"]
    if not ledger.begin(shard):  # another live score run is doing it (or committed it meanwhile)
        return []
    rows = RowBuffer(SCORE_READ_COLUMNS)
    members: dict[int, str] = {}  # row index → the member it is about (ShardLedger.expect) …
    input_members: dict[int, str] = {}  # … and a pair's input image member, for a reject of that image

    def reject(key: str, error: str, member: str = "") -> None:
        error = error if len(error) <= MAX_REASON else error[: MAX_REASON - 1] + "…"
        if member:
            members[len(rows)] = member
        rows.add(shard=shard, key=key, index=len(rows), kind=RowKind.REJECT, error=error, member=member)

    inputs, missing = (None, "") if input_uris is None else _input_images(input_uris.get(shard), shard,
                                                                          input_storage_options)
    data, failure = fetch_shard(uri, storage_options)
    if data is None:
        reject("", f"cannot read output shard {uri}: {failure}")
    seen: set[str] = set()
    for sample in iter_tar_samples(io.BytesIO(data)) if data is not None else ():
        if isinstance(sample, Exception):
            partial = sample.partial if isinstance(sample, TarDamage) else None
            key, member = (partial.key, sample.member or "") if partial is not None else ("", "")
            reject(key, f"corrupt or truncated output shard {uri}: {sample}", member=member)
            continue
        if sample.error or not sample.members:  # the raw key, even an unsafe one: the line is joined by it
            lone = sample.dropped[0][0] if len(sample.dropped) == 1 and not sample.members else ""
            reject(sample.key, f"output shard {uri}: {sample.error or 'a group with no usable member'}", member=lone)
            continue
        if sample.key in seen:
            reject(sample.key, f"duplicate key in output shard {uri}, first occurrence scored")
            continue
        seen.add(sample.key)
        found = image_member(sample.members)
        if found is None:
            reject(sample.key, f"no image member in output shard {uri} (key {sample.key!r})")
            continue
        name = sample.names[found[0]]
        if not found[1]:
            reject(sample.key, f"{EMPTY_IMAGE} {name!r} in output shard {uri} (key {sample.key!r})", member=name)
            continue
        row = {"shard": shard, "key": sample.key, "index": len(rows), "kind": RowKind.SAMPLE, "image": found[1],
               "image_name": name}
        if inputs is not None:
            if sample.key not in inputs:
                reject(sample.key, f"{INPUT_IMAGE} missing: key {sample.key!r} of shard {shard!r} is {missing}")
                continue
            input_name, input_image = inputs[sample.key]
            if not input_image:
                reject(sample.key, f"{EMPTY_IMAGE} {input_name!r} in input shard {input_uris[shard]} "
                                   f"(key {sample.key!r})", member=input_name)
                continue
            row["input_image"] = input_image
            input_members[len(rows)] = input_name
        members[len(rows)] = name  # what a decode reject of the pair is about (the input's: input_members)
        rows.add(**row)
    ledger.expect(shard, len(rows), members, input_members)
    return _listing(rows)


def decode_pairs(batch: dict, size: int, resize: str, max_pixels: int, exif_transpose: bool = True) -> dict:
    """Encoded output (and input) images → uint8 pixels of ``image.size``, as translate decoded its input."""
    rows = RowBuffer(SCORE_PIXEL_COLUMNS)
    for i in range(len(batch["key"])):  # PIL decodes one image at a time; this is the CPU stage's whole job
        row = {c: batch[c][i] for c in ("shard", "key", "index", "kind", "error")}
        if row["kind"] == RowKind.SAMPLE:
            which = "output"
            try:
                row["pixels"] = decode_image(bytes(batch["image"][i]), size, resize, max_pixels,
                                             exif_transpose=exif_transpose)
                which = "input"
                if len(batch["input_image"][i]):
                    row["input_pixels"] = decode_image(bytes(batch["input_image"][i]), size, resize, max_pixels,
                                                       exif_transpose=exif_transpose)
            except RejectedImage as exc:  # the pair is unusable: neither image goes on
                # "input image …" tells the commit to name the input's member (ShardLedger.expect)
                row = {"shard": row["shard"], "key": row["key"], "index": row["index"], "kind": RowKind.REJECT,
                       "error": f"{which} image of key {row['key']!r} (shard {row['shard']!r}): {exc}"}
        rows.add(**row)
    return rows.batch()


# ---- the score job's model stage -----------------------------------------------------------


@dataclass
class Pairs:
    """What ``prepare`` hands the device: the sample rows and their stacked uint8 images."""

    idx: np.ndarray
    outputs: torch.Tensor | None  # (n, H, W, 3) uint8, pinned when a GPU waits for it
    inputs: torch.Tensor | None


class ScoreStage(ModelStage):
    """Output (and input) pixels → SAMPLE rows carrying ``clip_score`` and ``directional`` and no
    pixels: the writer stages them as ``scores/<shard>.parquet`` rows and writes no image."""

    concurrent_batches = 2

    def __init__(self, clip: ClipConfig, score: ScoreConfig, source: ModelConfig, target: ModelConfig,
                 directional: bool = True, dtype: str = "auto", compile: str = "off"):
        super().__init__()  # dtype, compile: model_stage gives them to every stage; CLIP runs float32, eager
        self.directional = directional
        self.scorer = Scorer.load(clip, score, source, target, directional=directional)
        self.ready()

    def _host(self, arrays) -> torch.Tensor:
        t = torch.from_numpy(np.stack(arrays))
        return t.pin_memory() if self.scorer.device.type == "cuda" else t  # the copy in compute is asynchronous

    def prepare(self, batch: dict) -> Pairs:
        idx = self.samples(batch)
        if not len(idx):
            return Pairs(idx, None, None)
        inputs = self._host(batch["input_pixels"][idx]) if self.directional else None
        return Pairs(idx, self._host(batch["pixels"][idx]), inputs)

    def compute(self, work: Pairs) -> tuple[np.ndarray, np.ndarray] | None:
        if work.outputs is None:
            return None
        return self.scorer.score(work.outputs, work.inputs)

    def emit(self, batch: dict, work: Pairs, result) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        if result is None:
            return rows.batch()
        idx = work.idx
        rows.extend({"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                     "clip_score": result[0], "directional": result[1]}, kind=RowKind.SAMPLE)
        return rows.batch()
