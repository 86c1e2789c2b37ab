"""Frozen diffusers models behind one interface: ε_θ(x_t, t, condition) for a batch.

``load_denoiser`` assembles a *local* diffusers folder into a ``Denoiser`` (frozen, eval
mode). It does not resolve model sources: ``bundled:`` names, ``s3://`` / ``gs://`` folders
and hub ids, and the pickle policy, belong to ``pipeline.data.model_store.resolve_model``,
whose ``ModelFolder`` this function accepts. Everything else in ``pipeline.diffusion`` is
tensors in, tensors out.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.diffusion.schedule import Schedule, schedule_from_scheduler
from pipeline.errors import ModelLoadError

log = logging.getLogger(__name__)

Condition = int | str | None
COMPONENTS = ("unet", "scheduler", "vae", "vqvae", "text_encoder", "tokenizer")
# the first stage of a latent model: vae/ (AutoencoderKL, or a VQModel by its config's _class_name) or
# vqvae/ (diffusers' LDMPipeline layout, e.g. CompVis/ldm-celebahq-256)
FIRST_STAGES = {"vae": "AutoencoderKL", "vqvae": "VQModel"}  # folder → its default class
FIRST_STAGE_CLASSES = ("AutoencoderKL", "VQModel")


@dataclass
class Denoiser:
    """A frozen diffusion model as the maths needs it.

    ``eps`` gives ε_θ in float32 whatever the model's prediction type and dtype;
    ``to_model_space`` / ``to_pixels`` move between images in [-1, 1] and the space the
    diffusion runs in (identity for pixel models, scaled VAE latents for latent models).
    """

    unet: torch.nn.Module
    schedule: Schedule
    prediction_type: str = "epsilon"
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vae: torch.nn.Module | None = None
    vae_scaling_factor: float = 1.0
    vae_shift_factor: float = 0.0
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    num_class_embeds: int | None = None
    null_class: int | None = None
    compiled: bool = False  # the UNet is torch.compile'd: callers keep batch shapes fixed
    _prompt_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    # ---- what kind of model this is -------------------------------------------------
    @property
    def conditioning(self) -> str:
        """"text" (prompt), "class" (class index) or "none"."""
        if self.text_encoder is not None:
            return "text"
        if self.num_class_embeds:
            return "class"
        return "none"

    @property
    def is_latent_model(self) -> bool:
        return self.vae is not None

    @property
    def name(self) -> str:
        return self.source

    # ---- image <-> model space -----------------------------------------------------
    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1] → x0 in the diffusion's space, float32 on ``device``.

        Latent models use the VAE posterior mean (deterministic), scaled as in training:
        z = (mean − shift) · scaling_factor. A VQ first stage gives its latent before quantisation, as
        LDM's ``encode_first_stage`` does (its decoder quantises, ``VQModel.decode``).
        """
        x = images.to(self.device, torch.float32)
        if self.vae is None:
            return x
        encoded = self.vae.encode(x.to(self.dtype))
        mean = (encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents).float()
        return (mean - self.vae_shift_factor) * self.vae_scaling_factor

    @torch.no_grad()
    def to_pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in model space → images (B,3,H,W) clamped to [-1,1], float32."""
        if self.vae is None:
            return x0.float().clamp(-1, 1)
        z = x0 / self.vae_scaling_factor + self.vae_shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)

    def to_pixels_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """``to_pixels`` without no_grad and without the clamp: differentiable w.r.t. ``x0`` (an h-space
        loss, a guidance energy). The VAE decoder for a latent model, the identity for a pixel model."""
        if self.vae is None:
            return x0.float()
        z = x0 / self.vae_scaling_factor + self.vae_shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.float()

    def model_space_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, h, w) of model space for images of shape (3, H, W)."""
        if self.vae is None:
            return tuple(image_shape)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, image_shape[1] // factor, image_shape[2] // factor)

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
                conds += [self._unconditional()] * b + per_sample
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
        kind = self.conditioning
        if kind == "text":
            hidden = self._prompt_embeddings(conds)
            out = self.unet(x, ts, encoder_hidden_states=hidden).sample
        elif kind == "class":
            labels = torch.tensor(conds, device=self.device, dtype=torch.long)
            out = self.unet(x, ts, class_labels=labels).sample
        else:
            out = self.unet(x, ts).sample
        # a compiled UNet with CUDA graphs (reduce-overhead) reuses its output buffer on the next call
        return out.to(torch.float32, copy=self.compiled)

    def _per_sample(self, condition, b: int) -> list:
        items = list(condition) if isinstance(condition, (list, tuple)) else [condition] * b
        if len(items) != b:
            raise ValueError(f"got {len(items)} conditions for a batch of {b}")
        kind = self.conditioning
        if kind == "none":
            if any(c is not None for c in items):
                raise ValueError(f"model {self.source!r} is unconditional; its condition must be null")
            return items
        if kind == "class":
            out = []
            for c in items:
                if c is None:
                    if self.null_class is None:
                        raise ValueError(
                            f"model {self.source!r} is class-conditional: give a class index in 0..{self.num_class_embeds - 1}"
                        )
                    c = self.null_class
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_class_embeds:
                    raise ValueError(
                        f"model {self.source!r}: condition {c!r} is not a class index in 0..{self.num_class_embeds - 1}"
                    )
                out.append(int(c))
            return out
        return ["" if c is None else str(c) for c in items]

    def _unconditional(self):
        if self.conditioning == "text":
            return ""
        if self.null_class is None:
            raise ValueError(
                f"model {self.source!r}: classifier-free guidance needs an unconditional class; "
                "set null_class in the model section, or guidance_scale: 1"
            )
        return self.null_class

    def _prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text-encoder hidden states, cached per prompt (batches repeat prompts)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tok = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.text_encoder(tok.input_ids.to(self.device))[0]
            for p, h in zip(missing, hidden, strict=True):
                self._prompt_cache[p] = h
                if len(self._prompt_cache) > 4096:
                    self._prompt_cache.popitem(last=False)
        return torch.stack([self._prompt_cache[p] for p in prompts]).to(self.dtype)


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


def _local_folder(folder, source: str | None, allow_pickle: bool) -> tuple[Path, str, bool]:
    """(path, source, allow_pickle) of a local folder or a ModelFolder-like object."""
    if hasattr(folder, "path") and hasattr(folder, "source"):  # pipeline.data.model_store.ModelFolder
        path = Path(folder.path)
        src = source or str(folder.source)
        allow_pickle = allow_pickle or bool(getattr(folder, "allow_pickle", False))
    elif isinstance(folder, (str, os.PathLike)):
        path = Path(folder)
        src = source or str(folder)
    else:
        raise TypeError(f"load_denoiser takes a local folder or a ModelFolder, not {type(folder).__name__}")
    if not path.is_dir():
        raise ModelLoadError(
            f"model {src!r}: not a local folder; load_denoiser reads local diffusers folders only: give one, or resolve "
            f"the source first with pipeline.data.model_store.resolve_model({src!r}) (bundled:, s3://, gs://, hub ids) "
            "and pass its result"
        )
    return path, src, allow_pickle


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _components(folder: Path, source: str) -> dict[str, Path]:
    """Component name → subfolder: the subfolders the (resolved) folder has.

    Which components a model_index.json lists, and whether they are all there, is checked by
    ``pipeline.data.model_store.resolve_model``; this only needs to know what to assemble.
    """
    comps = {k: folder / k for k in COMPONENTS if (folder / k).is_dir()}
    if "unet" not in comps or "scheduler" not in comps:
        raise ModelLoadError(
            f"model {source!r}: not a diffusers model folder (expected unet/ and scheduler/ subfolders); "
            "pipeline.data.model_store.resolve_model checks a folder and says what is missing"
        )
    return comps


def _use_safetensors(component: Path, name: str, source: str, allow_pickle: bool) -> bool:
    """Load safetensors whenever the folder has them; anything else only with ``allow_pickle``.

    The pickle policy and its messages live in ``resolve_model``; this only makes sure an
    unresolved local folder cannot slip pickle weights past it.
    """
    if any(p.suffix == ".safetensors" for p in component.iterdir() if p.is_file()):
        return True
    if not allow_pickle:
        raise ModelLoadError(
            f"model {source!r}: no *.safetensors weights in {name}/; check the folder with "
            "pipeline.data.model_store.resolve_model, which explains the pickle policy (allow_pickle)"
        )
    return False


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

    path, source, allow_pickle = _local_folder(folder, source, allow_pickle)
    comps = _components(path, source)
    dev, dt = resolve_device_dtype(device, dtype)

    def load(cls, name):
        safe = _use_safetensors(comps[name], name, source, allow_pickle)
        try:
            model = cls.from_pretrained(comps[name], use_safetensors=safe, local_files_only=True, torch_dtype=dt)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"model {source!r}: cannot load {name}/ as {cls.__name__}: {exc}") from None
        return model.to(dev).eval().requires_grad_(False)

    unet_cfg = _read_json(comps["unet"] / "config.json")
    unet_cls_name = unet_cfg.get("_class_name", "UNet2DModel")
    if unet_cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ModelLoadError(f"model {source!r}: unet class {unet_cls_name} is not supported (UNet2DModel, UNet2DConditionModel)")
    if unet_cls_name == "UNet2DConditionModel" and ("text_encoder" not in comps or "tokenizer" not in comps):
        raise ModelLoadError(f"model {source!r}: a UNet2DConditionModel needs text_encoder/ and tokenizer/")
    unet = load(getattr(diffusers, unet_cls_name), "unet")

    sched_cfg = _read_json(comps["scheduler"] / "scheduler_config.json")
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    scheduler = sched_cls.from_pretrained(comps["scheduler"], local_files_only=True)
    schedule = schedule_from_scheduler(scheduler)
    if schedule.clip_sample or schedule.thresholding:
        log.info(
            "model %s: scheduler %s x̂0 (%s); applied identically when encoding and decoding",
            source, "thresholds" if schedule.thresholding else "clips", "exact reconstruction is kept",
        )

    den = Denoiser(
        unet=unet,
        schedule=schedule,
        prediction_type=scheduler.config.get("prediction_type", "epsilon"),
        source=source,
        device=dev,
        dtype=dt,
        num_class_embeds=unet_cfg.get("num_class_embeds"),
        null_class=null_class,
    )
    if den.num_class_embeds and null_class is not None and not 0 <= null_class < den.num_class_embeds:
        raise ModelLoadError(f"model {source!r}: null_class {null_class} is not in 0..{den.num_class_embeds - 1}")

    stage = next((k for k in FIRST_STAGES if k in comps), None)
    if stage is not None:
        cls_name = first_stage_class(_read_json(comps[stage] / "config.json"), stage, source)
        den.vae = load(getattr(diffusers, cls_name), stage)
        if cls_name == "VQModel":  # LDM's VQ models run at scale_factor 1: diffusers' LDMPipeline decodes
            den.vae_scaling_factor, den.vae_shift_factor = 1.0, 0.0  # latents unscaled, whatever the config holds
        else:
            den.vae_scaling_factor = float(den.vae.config.get("scaling_factor", 0.18215) or 1.0)
            den.vae_shift_factor = float(den.vae.config.get("shift_factor", 0.0) or 0.0)
    if unet_cls_name == "UNet2DConditionModel":
        import transformers

        te_cfg = _read_json(comps["text_encoder"] / "config.json")
        te_cls = getattr(transformers, (te_cfg.get("architectures") or ["CLIPTextModel"])[0], transformers.CLIPTextModel)
        den.text_encoder = load(te_cls, "text_encoder")
        den.tokenizer = transformers.AutoTokenizer.from_pretrained(comps["tokenizer"], local_files_only=True)
    return den


def first_stage_class(config: dict, folder: str, source: str) -> str:
    """The diffusers class of a latent model's first stage (``vae/`` or ``vqvae/``), checked."""
    name = config.get("_class_name", FIRST_STAGES[folder])
    if name not in FIRST_STAGE_CLASSES:
        raise ModelLoadError(f"model {source!r}: {folder}/ class {name} is not supported ({', '.join(FIRST_STAGE_CLASSES)})")
    return name


def check_weights_fit(folder, *, source: str | None = None) -> None:
    """The safetensors weights of a local model folder have the shapes its configs build.

    Each network is built on the meta device from its config (no memory, no weights) and its
    parameter shapes compared with the safetensors headers (no tensor is read). A preflight calls
    it before Ray starts, so weights that do not fit fail in one line, not on every actor.
    Tensors only one side names (renamed legacy keys, buffers) are left to the loader.
    """
    import diffusers
    from safetensors import safe_open

    path, source, _ = _local_folder(folder, source, True)
    for name in ("unet", *FIRST_STAGES, "text_encoder"):
        component = path / name
        files = sorted(component.glob("*.safetensors")) if component.is_dir() else []
        if not files:
            continue  # pickle weights (allow_pickle) are checked when loaded
        cfg = _read_json(component / "config.json")
        with torch.device("meta"):
            if name == "text_encoder":
                import transformers

                cls_name = (cfg.get("architectures") or ["CLIPTextModel"])[0]
                cls = getattr(transformers, cls_name, transformers.CLIPTextModel)
                model = cls(cls.config_class.from_dict(cfg))
            else:
                cls_name = cfg.get("_class_name", "UNet2DModel" if name == "unet" else FIRST_STAGES[name])
                cls = getattr(diffusers, cls_name, None)
                if cls is None:
                    continue  # an unsupported class is resolve_model's message
                model = cls.from_config(cfg)
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
