"""Pure torch diffusion maths: schedules, encoders, decoders. No Ray, no data I/O.

``denoiser.load_denoiser`` is the one entry that reads files: the weights and configs of a
*local* diffusers folder, through the adapter of its model family (``families/``). It resolves no model sources and imports nothing from
``pipeline.data``; ``pipeline.data.model_store.resolve_model`` turns ``bundled:``, ``s3://``,
``gs://`` and hub-id sources into a checked local folder (and applies the pickle policy) first.
"""

from pipeline.diffusion.ddim import (
    ddim_decode,
    ddim_decode_model_space,
    ddim_invert,
    ddim_invert_model_space,
)
from pipeline.diffusion.denoiser import Denoiser, load_denoiser
from pipeline.diffusion.dpm import (
    dpm_decode,
    dpm_decode_model_space,
    dpm_encode,
    dpm_encode_model_space,
    dpm_translate,
)
from pipeline.diffusion.latent import Latent
from pipeline.diffusion.noise import per_sample_noise, sample_seed

__all__ = [
    "Denoiser",
    "Latent",
    "ddim_decode",
    "ddim_decode_model_space",
    "ddim_invert",
    "ddim_invert_model_space",
    "dpm_decode",
    "dpm_decode_model_space",
    "dpm_encode",
    "dpm_encode_model_space",
    "dpm_translate",
    "load_denoiser",
    "per_sample_noise",
    "sample_seed",
]
