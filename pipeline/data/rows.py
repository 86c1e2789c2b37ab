"""The rows that flow between pipeline stages: one schema, stated once.

Every stage boundary is a numpy batch (Ray Data ``batch_format="numpy"``) whose columns are
listed here with their types. Tensors travel as tensor columns (Ray stores an object column of
ndarrays as an Arrow tensor column, fixed- or variable-shaped), never as bytes plus a shape
string. Carried metadata members stay bytes (two parallel list columns). What a row is, is an
explicit ``RowKind``. Provenance is assembled and serialised once, by the writer.

  read      (reader → decode)     INPUT_COLUMNS
  pixels    (decode → model)      PIXEL_COLUMNS
  latents   (latent reader → model, the decode job)   LATENT_INPUT_COLUMNS
  pairs     (score reader → decode → model, the score job)   SCORE_READ_COLUMNS, SCORE_PIXEL_COLUMNS
  model     (model → writer)      OUTPUT_COLUMNS
  manifest  (writer → driver)     MANIFEST_COLUMNS: one small row per staged part
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.run_metrics import METRIC_COLUMNS


class RowKind(enum.IntEnum):
    SAMPLE = 0  # one sample: its input (image, pixels, latent) or its output (pixels, provenance)
    REJECT = 1  # a sample, or a damaged stretch of a shard, that cannot be used; ``error`` says why
    LATENT = 2  # one map of a sample's latent: step 0 = x_start, step i = the noise leaving timesteps[i-1]
    PARTIAL = 3  # a partial result for the driver (e.g. an OOD fit), never written to storage


# Every column of every boundary, with the numpy dtype of its batch array ("object" columns hold
# str, bytes, ndarrays or lists of them) and the value a row that does not set it gets.
COLUMNS: dict[str, tuple[str, object]] = {
    "shard": ("object", ""),  # input shard basename: the unit of output naming, ledger and resumption
    "key": ("object", ""),  # the sample's __key__
    "index": ("int64", -1),  # position in its shard: outputs keep input order
    "kind": ("int8", int(RowKind.SAMPLE)),
    "error": ("object", ""),  # REJECT: a deterministic reason
    "member": ("object", ""),  # read REJECT: the tar member at fault, by its name in the tar ("" if none is)
    "image": ("object", b""),  # read: the encoded image member (bytes)
    "image_name": ("object", ""),  # read: its member name in the tar (a decode reject names it)
    "member_names": ("object", ()),  # carried metadata members: extensions …
    "member_data": ("object", ()),  # … and their bytes, unchanged
    "pixels": ("object", None),  # uint8 (H, W, 3): decoded input, or the output image
    "latent": ("object", None),  # latent reader: (1 + K, C, h, w) float32; LATENT rows: one map (C, h, w)
    "step": ("int32", -1),  # LATENT: which map
    "latent_rows": ("int32", 0),  # SAMPLE: how many LATENT rows the sample sends (the writer counts them)
    "timesteps": ("object", ()),  # int32 (K,): the grid of the latent
    "method": ("object", ""),  # "dpm" | "ddim"
    "eta": ("float32", 0.0),
    "seed": ("int64", 0),  # the sample's seed (noise depends on it alone)
    "candidate": ("int64", -1),  # ood sample: the candidate index drawn from the Gaussian
    "psnr": ("float32", math.nan),  # translate: output vs input (inf where identical, NaN unmeasured)
    "ssim": ("float32", math.nan),
    "source_model": ("object", ""),  # decode: the model the stored latent came from
    "source_cond": ("object", ""),  # decode: its condition, as the latent file stores it (JSON text)
    "partial": ("object", b""),  # PARTIAL: safetensors bytes for the driver
    "extra_names": ("object", ()),  # edit: member names of further output images of a sample ("scale1" …)
    "extra_pixels": ("object", None),  # … and their uint8 pixels stacked (n, H, W, 3), written as <name>.<image_format>
    "clip_score": ("float32", math.nan),  # cos(CLIP image, CLIP target text) of the output (NaN: not scored)
    "directional": ("float32", math.nan),  # directional CLIP of input → output against source → target text
    "ranked": ("object", ()),  # search: candidate indices, best first (the first is ``candidate``)
    "ranked_scores": ("object", ()),  # … and their directional CLIP scores
    "input_image": ("object", b""),  # score: the encoded input image of the same key (b"": not paired)
    # … decoded, uint8 (H, W, 3); unpaired: empty, not None, so the tensor column keeps one ndim (as ``pixels``)
    "input_pixels": ("object", np.zeros((0, 0, 3), np.uint8)),
    "features": ("object", None),  # eval: the image's float32 (D,) feature vector (empty: none)
    # manifest rows: what one staged part of a shard holds (pipeline.data.ledger counts them)
    "part": ("object", ""),
    "rows": ("int64", 0),  # SAMPLE + REJECT rows staged
    "latent_rows_expected": ("int64", 0),  # LATENT rows its samples announced
    "images": ("int64", 0),
    "rejected": ("int64", 0),
    **METRIC_COLUMNS,  # the part's quality and score sums (pipeline/data/run_metrics.py)
}

INPUT_COLUMNS = ("shard", "key", "index", "kind", "error", "member", "image", "image_name", "member_names", "member_data")
PIXEL_COLUMNS = ("shard", "key", "index", "kind", "error", "pixels", "member_names", "member_data")
LATENT_INPUT_COLUMNS = ("shard", "key", "index", "kind", "error", "latent", "timesteps", "method", "eta", "seed",
                        "source_model", "source_cond")
CANDIDATE_COLUMNS = ("shard", "key", "index", "kind", "candidate")
SCORE_READ_COLUMNS = ("shard", "key", "index", "kind", "error", "member", "image", "image_name", "input_image")
SCORE_PIXEL_COLUMNS = ("shard", "key", "index", "kind", "error", "pixels", "input_pixels")
OUTPUT_COLUMNS = ("shard", "key", "index", "kind", "error", "pixels", "latent", "step", "latent_rows",
                  "member_names", "member_data", "timesteps", "method", "eta", "seed", "candidate", "psnr",
                  "ssim", "source_model", "source_cond", "partial", "extra_names", "extra_pixels", "clip_score",
                  "directional", "ranked", "ranked_scores", "features")
MANIFEST_COLUMNS = ("shard", "part", "kind", "rows", "latent_rows", "latent_rows_expected", "images", "rejected",
                    *METRIC_COLUMNS, "partial")


class RowBuffer:
    """Rows appended one by one, returned as one typed numpy batch with exactly ``columns``."""

    def __init__(self, columns: tuple[str, ...] = OUTPUT_COLUMNS):
        self.columns = columns
        self.known = frozenset(columns)
        self.values: dict[str, list] = {c: [] for c in columns}

    def add(self, **row) -> None:
        unknown = row.keys() - self.known
        if unknown:
            raise KeyError(f"columns {sorted(unknown)} are not in this boundary's schema")
        for c in self.columns:
            self.values[c].append(row.get(c, COLUMNS[c][1]))

    def extend(self, per_row: dict, **same) -> None:
        """Many rows at once: ``per_row`` columns are sequences of one length, ``same`` values every row shares."""
        unknown = (per_row.keys() | same.keys()) - self.known
        if unknown:
            raise KeyError(f"columns {sorted(unknown)} are not in this boundary's schema")
        if not per_row:
            raise ValueError("extend needs at least one per-row column (it sets how many rows)")
        n = len(next(iter(per_row.values())))
        if any(len(v) != n for v in per_row.values()):
            raise ValueError("per-row columns must have one length")
        for c in self.columns:
            if c in per_row:
                self.values[c].extend(per_row[c])
            else:
                self.values[c].extend([same.get(c, COLUMNS[c][1])] * n)

    def __len__(self) -> int:
        return len(self.values[self.columns[0]])

    def batch(self) -> dict[str, np.ndarray]:
        return {c: column(c, v) for c, v in self.values.items()}


def column(name: str, values: list) -> np.ndarray:
    """One batch column in its schema dtype; tensor columns become object arrays of ndarrays."""
    dtype = COLUMNS[name][0]
    if dtype != "object":
        return np.asarray(values, dtype=dtype)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if name in ("pixels", "latent", "extra_pixels", "features"):
            v = _EMPTY[name] if v is None else v
        elif name in ("member_names", "member_data", "timesteps", "extra_names", "ranked", "ranked_scores"):
            v = list(v)
        out[i] = v
    return out


_EMPTY = {"pixels": np.zeros((0, 0, 3), np.uint8), "latent": np.zeros((0, 0, 0), np.float16),
          "extra_pixels": np.zeros((0, 0, 0, 3), np.uint8), "features": np.zeros((0,), np.float32)}


def rows_of(batch: dict, kind: RowKind) -> np.ndarray:
    """Indices of the rows of one kind."""
    return np.flatnonzero(np.asarray(batch["kind"]) == int(kind))


def members(batch: dict, i: int) -> dict[str, bytes]:
    """Row i's carried metadata members, extension → bytes."""
    return {str(n): bytes(d) for n, d in zip(batch["member_names"][i], batch["member_data"][i], strict=True)}


# ---- provenance ----------------------------------------------------------------------


@dataclass(frozen=True)
class LatentMeta:
    """The constants of a run's latent rows, as the latent Parquet stores them (data/latents.py)."""

    model: str
    method: str
    eta: float
    cond: object = None  # the map's dtype is the LATENT row's own (output.latent_dtype)


@dataclass(frozen=True)
class Provenance:
    """What every output sample records in its ``latentshift.json`` member.

    ``settings`` are the run's constants (models, conditions, sampler settings), set once by the
    job; ``for_sample`` adds the per-sample columns and serialises, once, in the writer.
    """

    job: str
    config_hash: str
    latentshift: str
    settings: dict = field(default_factory=dict)
    latents: LatentMeta | None = None

    def for_sample(self, batch: dict, i: int, latent_rows: int) -> dict:
        row = {**self.settings, "job": self.job, "config_hash": self.config_hash, "latentshift": self.latentshift,
               "source_shard": str(batch["shard"][i]), "key": str(batch["key"][i]),
               "timesteps": [int(t) for t in batch["timesteps"][i]], "sample_seed": int(batch["seed"][i]),
               "latent_rows": latent_rows}
        if int(batch["candidate"][i]) >= 0:
            row["candidate"] = int(batch["candidate"][i])
            if "search" in self.settings:  # the winner's settings, and the runners-up (search.top_k)
                grid = self.settings["search"]
                row["chosen"] = search_choice(grid, row["candidate"])
                if row["timesteps"]:  # the winning walk's first timestep (its start after ``skip``)
                    row["chosen"]["t0"] = row["timesteps"][0]
                row["ranked"] = [{**search_choice(grid, int(c)), "candidate": int(c), "directional": float(v)}
                                 for c, v in zip(batch["ranked"][i], batch["ranked_scores"][i], strict=True)]
        if str(batch["method"][i]):  # decode: the stored latent's own sampler
            row["method"], row["eta"] = str(batch["method"][i]), float(batch["eta"][i])
        if str(batch["source_model"][i]):
            row["source_model"] = str(batch["source_model"][i])
            row["source_condition"] = source_condition(batch["source_cond"][i])
        psnr, ssim = float(batch["psnr"][i]), float(batch["ssim"][i])
        if not math.isnan(ssim):
            row["psnr"] = psnr if math.isfinite(psnr) else None  # identical images: JSON has no inf
            row["ssim"] = ssim
        for name in ("clip_score", "directional"):
            if not math.isnan(float(batch[name][i])):
                row[name] = float(batch[name][i])
        return row

    def to_json(self, batch: dict, i: int, latent_rows: int) -> bytes:
        return json.dumps(self.for_sample(batch, i, latent_rows), sort_keys=True).encode()


def search_choice(grid: dict, candidate: int) -> dict:
    """A zero-shot search candidate's settings from its index. Candidates are numbered trial-major, then
    encoder scale, skip, decoder scale (the official loops: cycle-diffusion model/gan_wrapper/
    stable_diffusion_stochastic_text_wrapper.py:189-191 encode, :156 decode); the same order as
    ``pipeline.diffusion.search.SearchGrid``."""
    n_dec, n_skip, n_enc = len(grid["decoder_scales"]), len(grid["skips"]), len(grid["encoder_scales"])
    rest, dec = divmod(int(candidate), n_dec)
    rest, skip = divmod(rest, n_skip)
    trial, enc = divmod(rest, n_enc)
    steps, s = int(grid["steps"]), int(grid["skips"][skip])
    return {"trial": trial, "encoder_scale": grid["encoder_scales"][enc], "skip": s,
            "strength": strength_keeping(steps, steps - s), "decoder_scale": grid["decoder_scales"][dec]}


def strength_keeping(steps: int, keep: int) -> float:
    """The strength whose grid keeps ``keep`` of ``steps`` entries (``Schedule.grid``: int(steps·strength),
    as diffusers' img2img): keep/steps, nudged up by ulps where float rounding would floor it one short
    (99 · (59/99) = 58.99…), so a recorded strength reproduces its walk."""
    strength = keep / steps
    while int(steps * strength) < keep:
        strength = math.nextafter(strength, 2.0)
    return strength


def source_condition(cond_json) -> object:
    """A ``source_cond`` cell (the latent file's JSON text of the condition) → the condition."""
    return json.loads(str(cond_json) or "null")
