"""Frozen diffusers models behind one interface: ε_θ(x_t, t, condition) for a batch.

``load_denoiser`` assembles a *local* diffusers folder into a ``Denoiser`` (frozen, eval
mode): the unet, the scheduler's schedule, the family adapter that conditions and calls the unet
(``pipeline/diffusion/families/``) and, for a latent model, its first stage. It does not resolve
model sources: ``bundled:`` names, ``s3://`` / ``gs://`` folders and hub ids, and the pickle
policy, belong to ``pipeline.data.model_store.resolve_model``, whose ``ModelFolder`` this function
accepts. Everything else in ``pipeline.diffusion`` is tensors in, tensors out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pipeline.diffusion import families
from pipeline.diffusion.families import first_stage
from pipeline.diffusion.families.components import Components, local_folder, subfolders
from pipeline.diffusion.families.first_stage import FirstStage
from pipeline.diffusion.schedule import Schedule, schedule_from_scheduler
from pipeline.errors import ModelLoadError
from pipeline.model_layout import (
    CONFIG,
    FIRST_STAGES,
    SCHEDULER_CONFIG,
    Family,
    check_needs,
    read_json,
    unet_family,
    weight_components,
)

log = logging.getLogger(__name__)

Condition = int | str | None


class FamilyAdapter(Protocol):
    """What a family adapter gives the ``Denoiser`` (``pipeline/diffusion/families/__init__.py``)."""

    conditioning: str  # "none" | "class" | "text"

    def conditions(self, items: list) -> list: ...

    def unconditional(self) -> Condition: ...

    def forward(self, unet: torch.nn.Module, x: torch.Tensor, ts: torch.Tensor, conds: list) -> torch.Tensor: ...


@dataclass
class Denoiser:
    """A frozen diffusion model as the maths needs it.

    ``eps`` gives ε_θ in float32 whatever the model's prediction type and dtype;
    ``to_model_space`` / ``to_pixels`` move between images in [-1, 1] and the space the
    diffusion runs in (identity for pixel models, scaled first-stage latents for latent models).
    """

    unet: torch.nn.Module
    schedule: Schedule
    family: FamilyAdapter
    prediction_type: str = "epsilon"
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    first_stage: FirstStage | None = None
    compiled: bool = False  # the UNet is torch.compile'd: callers keep batch shapes fixed
    # the UNet predicts a variance beside ε (learned σ, improved DDPM / ADM: 2C output channels, ε the
    # first C, the interpolation v of log β̃_t … log β_t the rest); the DDIM-family formulas use ε only,
    # as the official CycleDiffusion and Asyrp code do (``_forward`` keeps the first C channels)
    learned_variance: bool = False

    # ---- what kind of model this is -------------------------------------------------
    @property
    def conditioning(self) -> str:
        """"text" (prompt), "class" (class index) or "none"."""
        return self.family.conditioning

    @property
    def is_latent_model(self) -> bool:
        return self.first_stage is not None

    @property
    def vae_scaling_factor(self) -> float:
        """The scale of the first stage's latents (1 for a pixel model)."""
        return 1.0 if self.first_stage is None else self.first_stage.scaling_factor

    @property
    def name(self) -> str:
        return self.source

    # ---- image <-> model space -----------------------------------------------------
    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] → x0 in the diffusion's space, float32 on ``device``
        (``FirstStage.encode`` for a latent model)."""
        x = images.to(self.device, torch.float32)
        return x if self.first_stage is None else self.first_stage.encode(x)

    @torch.no_grad()
    def to_pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in model space → images (B,3,H,W) clamped to [-1,1], float32."""
        return self.to_pixels_with_grad(x0).clamp(-1, 1)

    def to_pixels_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """``to_pixels`` without no_grad and without the clamp: differentiable w.r.t. ``x0`` (an h-space
        loss, a guidance energy). The first stage's decoder for a latent model, the identity for a pixel model."""
        return x0.float() if self.first_stage is None else self.first_stage.decode(x0)

    def model_space_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, h, w) of model space for images of shape (3, H, W)."""
        return tuple(image_shape) if self.first_stage is None else self.first_stage.latent_shape(image_shape)

    # ---- ε_θ ---------------------------------------------------------------------------
    # No torch.no_grad here: every weight is frozen, so no graph is built unless something the
    # caller brings requires grad (an h-space DeltaBlock being trained, hspace_train.py).
    def eps(
        self,
        x_t: torch.Tensor,
        t: int,
        condition: Condition | Sequence[Condition] = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """ε_θ(x_t, t, c) in float32, with classifier-free guidance ε_u + w(ε_c − ε_u)."""
        return self.eps_many(t, [(x_t, condition, guidance_scale)])[0]

    def eps_many(self, t: int, parts: Sequence[tuple[torch.Tensor, object, float]]) -> list[torch.Tensor]:
        """ε_θ of several (x_t, condition, guidance_scale) batches at one timestep, in one network call.

        A translation through one model walks its source and target side by side; one call for
        both (and their guidance branches) is what diffusers' CycleDiffusionPipeline does, and at
        the batch sizes that fit a GPU it is what decides the time.
        """
        xs, conds, plan = [], [], []
        for x, condition, guidance_scale in parts:
            b = x.shape[0]
            per_sample = self._per_sample(condition, b)
            guided = guidance_scale != 1.0 and self.conditioning != "none"
            if guided:
                xs += [x, x]
                conds += [self.family.unconditional()] * b + per_sample
            else:
                xs.append(x)
                conds += per_sample
            plan.append((b, guided, guidance_scale))
        out = self._forward(xs[0] if len(xs) == 1 else torch.cat(xs), t, conds)
        results, at = [], 0
        for (x, _, _), (b, guided, w) in zip(parts, plan, strict=True):
            if guided:
                out_u, out_c = out[at : at + b], out[at + b : at + 2 * b]
                o = out_u + w * (out_c - out_u)  # CFG (Ho & Salimans 2022, eq. 6)
                at += 2 * b
            else:
                o = out[at : at + b]
                at += b
            results.append(self._as_eps(o, x.float(), t))
        return results

    def _as_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Convert the network's prediction to ε; affine in ``out``, so CFG commutes with it."""
        a = self.schedule.alpha(t)
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            return math.sqrt(a) * out + math.sqrt(1 - a) * x_t  # ε = √ᾱ v + √(1−ᾱ) x_t
        if self.prediction_type == "sample":
            return (x_t - math.sqrt(a) * out) / math.sqrt(1 - a)  # ε = (x_t − √ᾱ x̂0)/√(1−ᾱ)
        raise ModelLoadError(f"model {self.source!r}: unknown prediction_type {self.prediction_type!r}")

    def _forward(self, x: torch.Tensor, t: int, conds: list) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        ts = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
        out = self.family.forward(self.unet, x, ts, conds)
        if self.learned_variance:
            out = out[:, : x.shape[1]]  # ε; the variance half is unused by every sampler here
        # a compiled UNet with CUDA graphs (reduce-overhead) reuses its output buffer on the next call
        return out.to(torch.float32, copy=self.compiled)

    def _per_sample(self, condition, b: int) -> list:
        items = list(condition) if isinstance(condition, (list, tuple)) else [condition] * b
        if len(items) != b:
            raise ValueError(f"got {len(items)} conditions for a batch of {b}")
        return self.family.conditions(items)


# ---- loading --------------------------------------------------------------------------


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """CUDA when present; fp16 on GPU and fp32 on CPU unless overridden ("auto" = default)."""
    dev = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype in (None, "auto"):
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of auto, float32, float16, bfloat16, float64")
        dt = names[dtype]
    return dev, dt


def load_denoiser(
    folder,
    *,
    source: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    null_class: int | None = None,
) -> Denoiser:
    """Assemble a local diffusers pixel or latent model as a ``Denoiser`` (frozen, eval mode).

    ``folder`` is a local diffusers folder (str or path) or the ``ModelFolder`` that
    ``pipeline.data.model_store.resolve_model(source)`` returns; ``source`` overrides the
    name used in messages and provenance (``Denoiser.source``).
    """
    import diffusers

    path, source, allow_pickle = local_folder(folder, source, allow_pickle)
    dev, dt = resolve_device_dtype(device, dtype)
    parts = Components(source, subfolders(path, source), allow_pickle, dev, dt)
    family, unet_config = unet_family(parts.folders["unet"], source)
    check_needs(family, parts, source)
    unet = parts.load(getattr(diffusers, family.unet_class), "unet")

    sched_cfg = parts.config("scheduler", SCHEDULER_CONFIG)
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    scheduler = sched_cls.from_pretrained(parts.folders["scheduler"], local_files_only=True)
    schedule = schedule_from_scheduler(scheduler)
    if schedule.clip_sample or schedule.thresholding:
        log.info(
            "model %s: scheduler %s x̂0 (%s); applied identically when encoding and decoding",
            source, "thresholds" if schedule.thresholding else "clips", "exact reconstruction is kept",
        )
    learned_variance = unet_config.get("out_channels") == 2 * unet_config.get("in_channels", -1)
    if learned_variance:
        log.info("model %s predicts a learned variance (%d output channels): ε is the first %d; DDIM, DPM-Encoder, "
                 "h-space, guidance and the search use ε only", source, unet_config["out_channels"],
                 unet_config["in_channels"])
    return Denoiser(
        learned_variance=learned_variance,
        unet=unet,
        schedule=schedule,
        family=families.adapter(family).load(parts, unet_config, null_class),
        prediction_type=scheduler.config.get("prediction_type", "epsilon"),
        source=source,
        device=dev,
        dtype=dt,
        first_stage=first_stage.load(parts),
    )


def check_weights_fit(folder, *, source: str | None = None) -> None:
    """The safetensors weights of a local model folder have the shapes its configs build.

    Each network is built on the meta device from its config (no memory, no weights) and its
    parameter shapes compared with the safetensors headers (no tensor is read). A preflight calls
    it before Ray starts, so weights that do not fit fail in one line, not on every actor.
    Tensors only one side names (renamed legacy keys, buffers) are left to the loader.
    """
    from safetensors import safe_open

    path, source, _ = local_folder(folder, source, True)
    family, _ = unet_family(path / "unet", source)
    present = {p.name for p in path.iterdir() if p.is_dir()}
    for name in weight_components(family, present):
        files = sorted((path / name).glob("*.safetensors"))
        if not files:
            continue  # pickle weights (allow_pickle) are checked when loaded
        with torch.device("meta"):
            model = _empty_network(family, name, read_json(path / name / CONFIG))
        if model is None:
            continue  # an unsupported class is load_denoiser's message
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shape = tuple(st.get_slice(key).get_shape())
                    if key in expected and expected[key] != shape:
                        raise ModelLoadError(
                            f"model {source!r}: {name}/{f.name} holds {key} of shape {list(shape)}, but "
                            f"{name}/config.json builds {list(expected[key])}: the weights do not fit this config"
                        )


def _empty_network(family: Family, name: str, config: dict) -> torch.nn.Module | None:
    """Component ``name`` of a ``family`` model built from its config, without weights."""
    import diffusers

    if name == "unet":
        return getattr(diffusers, family.unet_class).from_config(config)
    if name in FIRST_STAGES:
        return first_stage.build(name, config)
    return families.adapter(family).build(name, config)
