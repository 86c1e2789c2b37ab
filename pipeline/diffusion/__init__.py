"""Pure torch diffusion maths: schedules, encoders, decoders. No Ray, no data I/O.

``models.load_denoiser`` is the one entry that reads files (model weights).
"""

from pipeline.diffusion.ddim import (
    ddim_decode,
    ddim_decode_model_space,
    ddim_invert,
    ddim_invert_model_space,
)
from pipeline.diffusion.dpm import (
    dpm_decode,
    dpm_decode_model_space,
    dpm_encode,
    dpm_encode_model_space,
)
from pipeline.diffusion.latent import Latent
from pipeline.diffusion.models import Denoiser, load_denoiser
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
    "load_denoiser",
    "per_sample_noise",
    "sample_seed",
]
