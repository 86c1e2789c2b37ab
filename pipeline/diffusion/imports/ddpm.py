"""The DDPM family (Ho et al.'s network as ported to PyTorch by ermongroup/ddim): its published state
dicts onto diffusers' ``UNet2DModel``, exactly.

The original is ``Model`` in ermongroup/ddim ``models/diffusion.py`` (commit e8df66c, lines 192-341);
SDEdit, DiffusionCLIP, Asyrp (kwonminki/Asyrp_official ``models/ddpm/diffusion.py``) and
CycleDiffusion (ChenWu98/cycle-diffusion ``model/lib/ddpm_ddim/models/ddpm/diffusion.py`` ``DDPM``)
carry the same class and load the same files: SDEdit's CelebA-HQ 256 ``celeba_hq.ckpt`` and the LSUN
church / bedroom 256 checkpoints (pesser/pytorch_diffusion's ports of the TF originals, ddim
``functions/ckpt_util.py:5-35``).

The mapping follows diffusers ``scripts/convert_ddpm_original_checkpoint_to_diffusers.py``
(huggingface/diffusers 58eb52c, ``convert_ddpm_checkpoint`` at :99-232), written out key by key, with
two corrections to that script:

- the downsampler's conv is ``down.{i}.downsample.conv`` in the original (``Downsample.conv``,
  diffusion.py:61); the script reads ``downsample.op`` (:130-133; the right names are its commented
  lines :134-135);
- attention goes to today's ``Attention`` names (``to_q``/``to_k``/``to_v``/``to_out.0``/
  ``group_norm``) with the 1x1 conv kernels squeezed to linear weights (the script writes the old
  ``query``/``key``/``value``/``proj_attn`` names, :43-48, and squeezes at :93-94).

Each detail, checked against the original code (diffusion.py line numbers):

- time embedding: sin first, then cos (:21) -> ``flip_sin_to_cos=False``; frequencies
  ``exp(-log(10000) * i / (half - 1))`` (:17-18) -> ``freq_shift=1`` (diffusers divides by
  ``half - freq_shift``); ``dense[0]``, swish, ``dense[1]`` (:306-308) -> ``TimestepEmbedding``
  ``linear_1``, SiLU, ``linear_2``; width ``4 * ch`` (:209) is diffusers' default
  ``block_out_channels[0] * 4``;
- norms: ``GroupNorm(32, C, eps=1e-6)`` everywhere (:32-33) -> ``norm_num_groups=32``,
  ``norm_eps=1e-6`` (resnets, attention and the output norm alike);
- resnet: norm1, swish, conv1, ``+ temb_proj(swish(temb))``, norm2, swish, dropout, conv2, and a 1x1
  ``nin_shortcut`` when the width changes (:115-134) -> ``ResnetBlock2D`` (``time_emb_proj``,
  ``conv_shortcut``; ``time_embedding_norm="default"``, output scale 1);
- attention: one head over all C channels, scale ``C ** -0.5``, 1x1-conv q, k, v, proj_out, residual
  (:164-189) -> ``Attention`` with ``attention_head_dim=None`` (diffusers then uses the block's width
  as the head dimension: one head), no head reordering needed;
- down path: ``conv_in``, then per level ``num_res_blocks`` resnets (each followed by its attention
  where the level's resolution is in ``attn_resolutions``), every output kept as a skip, and a
  stride-2 3x3 conv after zero-padding right/bottom by one (:55-74) on all levels but the last ->
  ``AttnDownBlock2D``/``DownBlock2D`` with ``downsample_padding=0`` (diffusers pads (0, 1, 0, 1)
  itself when the padding is 0);
- middle: block_1, attn_1, block_2 (:321-325) -> ``UNetMidBlock2D`` resnets.0, attentions.0,
  resnets.1; h-space is ``mid.block_2``'s output, which is the diffusers mid block's output;
- up path: per level (deepest first) ``num_res_blocks + 1`` resnets on ``cat([h, skip])`` in that
  order (:328-335), then nearest x2 and a 3x3 conv -> ``AttnUpBlock2D``/``UpBlock2D``; the original
  stores its up levels shallow-first (``self.up.insert(0, up)``, :291), so ``up.{i}`` is diffusers'
  ``up_blocks.{L-1-i}``;
- out: norm_out, swish, conv_out (:338-340) -> ``conv_norm_out``, SiLU, ``conv_out``.

What ``UNet2DModel`` cannot express, refused here with one line instead of converted approximately:

- ``resamp_with_conv: false`` (average-pool down / conv-less up): diffusers' ``DownBlock2D`` and
  ``UpBlock2D`` always resample with a conv. Every published checkpoint of the family has it true;
- ``model.type: bayesian`` checkpoints: their ``logvar`` vector (diffusion.py:205-206) is a learned
  per-step variance outside the network; it is reported as an unexpected key;
- the 3x3 ``conv_shortcut`` variant of ``ResnetBlock`` (:102-107) is never built by ``Model``; a key
  of it is unexpected.

The variance of the published models is fixed (``var_type``), not learned: it travels in
``scheduler_config`` as diffusers' ``variance_type``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from pipeline.diffusion.imports.checkpoint import target_shapes
from pipeline.errors import ConfigError, ModelLoadError

NORM_GROUPS = 32  # Normalize(): GroupNorm(num_groups=32, ..., eps=1e-6), ddim models/diffusion.py:32-33
NORM_EPS = 1e-6
VAR_TYPES = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}


@dataclass(frozen=True)
class DDPMArch:
    """The architecture keys of ``Model`` (the ``model:``/``data:``/``diffusion:`` keys of the ddim
    yaml configs, ``resolution`` being ``data.image_size``) and the diffusion schedule it was trained with."""

    resolution: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    resamp_with_conv: bool = True
    var_type: str = "fixedsmall"
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_diffusion_timesteps: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        bad = []
        if self.ch <= 0 or self.ch % NORM_GROUPS:
            bad.append(f"ch {self.ch} is not a positive multiple of {NORM_GROUPS} (GroupNorm groups)")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            bad.append(f"ch_mult {list(self.ch_mult)} must be positive")
        if self.num_res_blocks < 1:
            bad.append(f"num_res_blocks {self.num_res_blocks} < 1")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            bad.append(f"resolution {self.resolution} does not halve {len(self.ch_mult) - 1} times")
        if not self.resamp_with_conv:
            bad.append("resamp_with_conv false (pooling/conv-less resampling) has no exact UNet2DModel form")
        if self.var_type not in VAR_TYPES:
            bad.append(f"var_type {self.var_type!r} is not one of {sorted(VAR_TYPES)}")
        if self.beta_schedule != "linear":
            bad.append(f"beta_schedule {self.beta_schedule!r}: only 'linear' is supported")
        if bad:
            raise ConfigError("DDPM architecture: " + "; ".join(bad))

    @classmethod
    def from_dict(cls, keys: Mapping) -> DDPMArch:
        """From explicit keys (``--arch ddpm`` with keys); ``image_size`` is accepted for ``resolution``."""
        keys = dict(keys)
        if "image_size" in keys:
            keys.setdefault("resolution", keys.pop("image_size"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ConfigError(f"DDPM architecture: unknown key(s) {unknown}; known: {sorted(known)}")
        if "resolution" not in keys:
            raise ConfigError("DDPM architecture: 'resolution' (the image size) is required")
        return cls(**keys)

    def level_resolutions(self) -> list[int]:
        return [self.resolution // 2**i for i in range(len(self.ch_mult))]

    def attn_levels(self) -> list[bool]:
        return [r in self.attn_resolutions for r in self.level_resolutions()]


# The published checkpoints. All three: ch 128, ch_mult [1,1,2,2,4,4], 2 res blocks, attention at 16,
# dropout 0.0, resamp_with_conv true, var_type fixedsmall, linear beta 1e-4..0.02 over 1000 steps.
PRESETS: dict[str, DDPMArch] = {
    # SDEdit's celeba_hq.ckpt (a plain state dict: Asyrp diffusion_latent.py:85 (its URL), :104-124
    # (torch.load, load_state_dict)) as Asyrp and DiffusionCLIP configure it: kwonminki/Asyrp_official
    # configs/celeba.yml:4 (image_size), :13-25 (model), :27-31 (diffusion); CycleDiffusion reads the
    # same file with the same celeba.yml (ChenWu98/cycle-diffusion model/gan_wrapper/ddpm_ddim_wrapper.py:26-33, :96).
    "celeba-hq-256": DDPMArch(resolution=256),
    # ermongroup/ddim configs/church.yml:4, :13-25, :27-31 (also Asyrp configs/church.yml, same lines);
    # file: ddim functions/ckpt_util.py:13 ("ema_lsun_church").
    "lsun-church-256": DDPMArch(resolution=256),
    # ermongroup/ddim configs/bedroom.yml:4, :13-25, :27-31 (also Asyrp configs/bedroom.yml);
    # file: ddim functions/ckpt_util.py:9 ("ema_lsun_bedroom").
    "lsun-bedroom-256": DDPMArch(resolution=256),
}


def preset(name: str) -> DDPMArch:
    if name not in PRESETS:
        raise ConfigError(f"unknown DDPM preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def unet_config(arch: DDPMArch) -> dict:
    """The ``UNet2DModel(**config)`` that computes exactly what ``Model`` computes (see the module doc)."""
    attn = arch.attn_levels()
    n = len(arch.ch_mult)
    return {
        "sample_size": arch.resolution,
        "in_channels": arch.in_channels,
        "out_channels": arch.out_ch,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if attn[n - 1 - k] else "UpBlock2D" for k in range(n)],
        "block_out_channels": [arch.ch * m for m in arch.ch_mult],
        "layers_per_block": arch.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": arch.dropout,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": NORM_GROUPS,
        "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "num_train_timesteps": arch.num_diffusion_timesteps,
    }


def scheduler_config(arch: DDPMArch) -> dict:
    """The DDPMScheduler / DDIMScheduler config of the paper's schedule (ermongroup/ddim): betas
    ``linspace(beta_start, beta_end, T)`` (runners/diffusion.py:42-45), ε-prediction, no clipping of
    x0 (DDIM's ``generalized_steps``, functions/denoising.py:10-32, does not clip; only ``ddpm_steps``
    clamps, :54), ᾱ before step 0 equal to 1 (``compute_alpha`` prepends a zero β,
    functions/denoising.py:4-7), and the fixed variance of ``var_type`` (runners/diffusion.py:91-96:
    fixedlarge β_t, fixedsmall the posterior variance clamped at 1e-20, as diffusers' fixed_large /
    fixed_small)."""
    return {
        "num_train_timesteps": arch.num_diffusion_timesteps,
        "beta_schedule": arch.beta_schedule,
        "beta_start": arch.beta_start,
        "beta_end": arch.beta_end,
        "prediction_type": "epsilon",
        "variance_type": VAR_TYPES[arch.var_type],
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
    }


def _resnet(src: str, dst: str, cin: int, cout: int, temb: int) -> dict[str, tuple[str, tuple]]:
    m = {
        f"{src}.norm1.weight": (f"{dst}.norm1.weight", (cin,)),
        f"{src}.norm1.bias": (f"{dst}.norm1.bias", (cin,)),
        f"{src}.conv1.weight": (f"{dst}.conv1.weight", (cout, cin, 3, 3)),
        f"{src}.conv1.bias": (f"{dst}.conv1.bias", (cout,)),
        f"{src}.temb_proj.weight": (f"{dst}.time_emb_proj.weight", (cout, temb)),
        f"{src}.temb_proj.bias": (f"{dst}.time_emb_proj.bias", (cout,)),
        f"{src}.norm2.weight": (f"{dst}.norm2.weight", (cout,)),
        f"{src}.norm2.bias": (f"{dst}.norm2.bias", (cout,)),
        f"{src}.conv2.weight": (f"{dst}.conv2.weight", (cout, cout, 3, 3)),
        f"{src}.conv2.bias": (f"{dst}.conv2.bias", (cout,)),
    }
    if cin != cout:  # ResnetBlock: a 1x1 nin_shortcut when the width changes (diffusion.py:101-113)
        m[f"{src}.nin_shortcut.weight"] = (f"{dst}.conv_shortcut.weight", (cout, cin, 1, 1))
        m[f"{src}.nin_shortcut.bias"] = (f"{dst}.conv_shortcut.bias", (cout,))
    return m


def _attn(src: str, dst: str, c: int) -> dict[str, tuple[str, tuple]]:
    m = {f"{src}.norm.weight": (f"{dst}.group_norm.weight", (c,)), f"{src}.norm.bias": (f"{dst}.group_norm.bias", (c,))}
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        m[f"{src}.{a}.weight"] = (f"{dst}.{b}.weight", (c, c, 1, 1))  # 1x1 conv -> linear: squeezed
        m[f"{src}.{a}.bias"] = (f"{dst}.{b}.bias", (c,))
    return m


def key_map(arch: DDPMArch) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every key of the original state dict -> (its diffusers key, its original shape), in the order
    ``Model.__init__`` builds them (diffusion.py:215-299)."""
    ch, temb, nres, n = arch.ch, arch.ch * 4, arch.num_res_blocks, len(arch.ch_mult)
    attn = arch.attn_levels()
    m: dict[str, tuple[str, tuple]] = {
        "temb.dense.0.weight": ("time_embedding.linear_1.weight", (temb, ch)),
        "temb.dense.0.bias": ("time_embedding.linear_1.bias", (temb,)),
        "temb.dense.1.weight": ("time_embedding.linear_2.weight", (temb, temb)),
        "temb.dense.1.bias": ("time_embedding.linear_2.bias", (temb,)),
        "conv_in.weight": ("conv_in.weight", (ch, arch.in_channels, 3, 3)),
        "conv_in.bias": ("conv_in.bias", (ch,)),
    }
    in_mult = (1, *arch.ch_mult)
    block_in = ch
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * arch.ch_mult[i]
        for j in range(nres):
            m.update(_resnet(f"down.{i}.block.{j}", f"down_blocks.{i}.resnets.{j}", block_in, block_out, temb))
            block_in = block_out
            if attn[i]:
                m.update(_attn(f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}", block_in))
        if i != n - 1:
            m[f"down.{i}.downsample.conv.weight"] = (f"down_blocks.{i}.downsamplers.0.conv.weight", (block_in, block_in, 3, 3))
            m[f"down.{i}.downsample.conv.bias"] = (f"down_blocks.{i}.downsamplers.0.conv.bias", (block_in,))
    m.update(_resnet("mid.block_1", "mid_block.resnets.0", block_in, block_in, temb))
    m.update(_attn("mid.attn_1", "mid_block.attentions.0", block_in))
    m.update(_resnet("mid.block_2", "mid_block.resnets.1", block_in, block_in, temb))
    for i in reversed(range(n)):
        k = n - 1 - i  # up.{i} is stored shallow-first (diffusion.py:291); diffusers runs deepest-first
        block_out = skip_in = ch * arch.ch_mult[i]
        for j in range(nres + 1):
            if j == nres:
                skip_in = ch * in_mult[i]
            m.update(_resnet(f"up.{i}.block.{j}", f"up_blocks.{k}.resnets.{j}", block_in + skip_in, block_out, temb))
            block_in = block_out
            if attn[i]:
                m.update(_attn(f"up.{i}.attn.{j}", f"up_blocks.{k}.attentions.{j}", block_in))
        if i != 0:
            m[f"up.{i}.upsample.conv.weight"] = (f"up_blocks.{k}.upsamplers.0.conv.weight", (block_in, block_in, 3, 3))
            m[f"up.{i}.upsample.conv.bias"] = (f"up_blocks.{k}.upsamplers.0.conv.bias", (block_in,))
    m["norm_out.weight"] = ("conv_norm_out.weight", (block_in,))
    m["norm_out.bias"] = ("conv_norm_out.bias", (block_in,))
    m["conv_out.weight"] = ("conv_out.weight", (arch.out_ch, block_in, 3, 3))
    m["conv_out.bias"] = ("conv_out.bias", (arch.out_ch,))
    return m




def _first(keys, k: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - k} more)" if len(keys) > k else ""
    return ", ".join(keys[:k]) + more


def _fit(found: Mapping[str, tuple], wanted: Mapping[str, tuple], what: str) -> None:
    """One line on the first disagreement between two key -> shape tables, or nothing."""
    missing = [k for k in wanted if k not in found]
    unexpected = [k for k in found if k not in wanted]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing: {_first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_first(unexpected)}")
    if not parts:
        for k, shape in wanted.items():
            if tuple(found[k]) != tuple(shape):
                parts.append(f"{k} has shape {tuple(found[k])}, expected {tuple(shape)}")
                break
    if parts:
        raise ModelLoadError(f"{what}: " + "; ".join(parts))


def check(state_dict: Mapping[str, Tensor], arch: DDPMArch) -> None:
    """Every key of ``state_dict`` is one ``Model(arch)`` has and has the shape it has, and no key is
    missing: else one ``ModelLoadError`` line naming the first missing/unexpected keys or the first
    shape that differs."""
    wanted = {k: shape for k, (_, shape) in key_map(arch).items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    _fit(found, wanted, f"the checkpoint does not fit DDPM {_describe(arch)}")


def _describe(arch: DDPMArch) -> str:
    return (f"(resolution {arch.resolution}, ch {arch.ch}, ch_mult {list(arch.ch_mult)}, "
            f"{arch.num_res_blocks} res blocks, attention at {list(arch.attn_resolutions)})")



def convert(state_dict: Mapping[str, Tensor], arch: DDPMArch) -> tuple[dict, dict[str, Tensor]]:
    """(``UNet2DModel`` config, its state dict) from a normalised original state dict. Every source key is
    consumed and every target key filled with the shape the target has (else ``ModelLoadError``); the
    tensors are the source's own (1x1 attention kernels as views), so no weight is copied."""
    check(state_dict, arch)
    config = unet_config(arch)
    out: dict[str, Tensor] = {}
    for src, (dst, shape) in key_map(arch).items():
        value = state_dict[src]
        out[dst] = value.reshape(shape[:2]) if ".attentions." in dst and len(shape) == 4 else value
    _fit({k: tuple(v.shape) for k, v in out.items()}, target_shapes(config),
         "the converted DDPM state dict does not fit UNet2DModel")
    return config, out
