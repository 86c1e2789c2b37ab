"""What a diffusers model folder holds, per model family: pure data and JSON, no torch.

Two layers read a model folder and may not import each other (tests/unit/test_architecture.py):
the model store checks a folder before anything loads (``pipeline/data/model_store.py``, no torch)
and the denoiser loads it (``pipeline/diffusion/families/``, one adapter per family). This is the
one description both read: the component folders, the unet class that names a family, what each
family cannot run without, and what its conditioning is.

A family is told apart by the ``_class_name`` of ``unet/config.json``. A latent model is any family
plus a first stage (``vae/`` or ``vqvae/``), which is why the first stage is not a family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ModelLoadError

# every component folder a family or a first stage reads; vqvae/ is diffusers' LDMPipeline layout
# (e.g. CompVis/ldm-celebahq-256)
COMPONENTS = ("unet", "scheduler", "vae", "vqvae", "text_encoder", "tokenizer")
CONFIG = "config.json"  # of unet/, vae/, vqvae/ and text_encoder/
SCHEDULER_CONFIG = "scheduler_config.json"

# the first stage of a latent model: vae/ (AutoencoderKL, or a VQModel by its config's _class_name)
# or vqvae/ (a VQModel)
FIRST_STAGES = {"vae": "AutoencoderKL", "vqvae": "VQModel"}  # folder → its default class
FIRST_STAGE_CLASSES = ("AutoencoderKL", "VQModel")


@dataclass(frozen=True)
class Family:
    """A kind of diffusers model: its unet class and the folders it needs besides unet/ and scheduler/.

    ``name`` is its adapter, ``pipeline/diffusion/families/<name>.py``.
    """

    name: str
    unet_class: str  # the _class_name of unet/config.json
    needs: tuple[str, ...] = ()  # component folders it cannot run without
    encoders: tuple[str, ...] = ()  # its weight-bearing components besides unet/ (a first stage aside)
    prompts: bool = False  # conditioned on a prompt through its text encoder

    def conditioning(self, unet_config: dict) -> str:
        """What ``source.condition`` may be: "text" (a prompt), "class" (a class index) or "none"."""
        if self.prompts:
            return "text"
        return "class" if unet_config.get("num_class_embeds") else "none"


PIXEL = Family("pixel", "UNet2DModel")  # DDPM / LDM unets: unconditional or class-conditional
TEXT = Family("text", "UNet2DConditionModel", needs=("text_encoder", "tokenizer"), encoders=("text_encoder",),
              prompts=True)  # Stable Diffusion: a CLIP text encoder and its tokenizer
FAMILIES = (PIXEL, TEXT)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def unet_family(unet: Path, source: str) -> tuple[Family, dict]:
    """The family of the unet/ folder ``unet`` and its config; an unsupported class is refused."""
    config = read_json(unet / CONFIG)
    name = config.get("_class_name", PIXEL.unet_class)
    family = next((f for f in FAMILIES if f.unet_class == name), None)
    if family is None:
        supported = ", ".join(f.unet_class for f in FAMILIES)
        raise ModelLoadError(f"model {source!r}: unet class {name} is not supported ({supported})")
    return family, config


def check_needs(family: Family, components, source: str) -> None:
    """Every folder ``family`` cannot run without is among ``components``."""
    if any(name not in components for name in family.needs):
        folders = " and ".join(f"{name}/" for name in family.needs)
        raise ModelLoadError(f"model {source!r}: a {family.unet_class} needs {folders}")


def weight_components(family: Family, components) -> list[str]:
    """The weight-bearing components of a folder of ``family`` that the denoiser loads, in load order."""
    return [name for name in ("unet", *FIRST_STAGES, *family.encoders) if name in components]


def first_stage_class(config: dict, folder: str, source: str) -> str:
    """The diffusers class of a latent model's first stage (``vae/`` or ``vqvae/``), checked."""
    name = config.get("_class_name", FIRST_STAGES[folder])
    if name not in FIRST_STAGE_CLASSES:
        raise ModelLoadError(
            f"model {source!r}: {folder}/ class {name} is not supported ({', '.join(FIRST_STAGE_CLASSES)})"
        )
    return name
