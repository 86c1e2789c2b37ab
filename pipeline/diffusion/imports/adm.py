"""ADM / improved DDPM checkpoints (openai/guided-diffusion ``guided_diffusion/unet.py``
``UNetModel``) onto diffusers' ``UNet2DModel``: the architecture keys, the presets of the published
files, and a pure state-dict mapping (no file I/O: the caller loads the pickle with
``torch.load(path, weights_only=True)`` and hands the object to ``checkpoint.normalise``).

The mapping follows diffusers' ``scripts/convert_consistency_to_diffusers.py`` (the ADM-style UNet of
consistency models: ``convert_resnet`` :123-139, ``convert_attention`` :142-161, the block walk of
``con_pt_to_diffuser`` :164-266, the ``UNet2DModel`` configs :13-88), with what differs in
guided-diffusion's UNet (commit 22e0df8, the line numbers below are of that commit):

- **attention head order.** guided-diffusion's default ``QKVAttentionLegacy`` (unet.py:328-358,
  chosen when ``use_new_attention_order=False``, unet.py:287-292, as every published AFHQ/FFHQ/ImageNet
  256 model is) splits the ``qkv`` rows by head first, then into q, k, v: rows are
  ``[q_0 k_0 v_0 q_1 k_1 v_1 …]`` in blocks of the head width. The consistency-models UNet uses the
  other order (``[q | k | v]``, guided-diffusion's ``QKVAttention``, unet.py:361-393), which is what
  the script's ``chunk(3)`` assumes; for a legacy model with more than one head that would scramble
  the heads, so the rows are regrouped here per head. Both scale q and k by ``ch ** -0.25``: the
  same ``1/sqrt(head width)`` as diffusers' ``Attention``, so ``attention_head_dim`` is the head width.
- **time embedding**: ``timestep_embedding`` (nn.py:103-121) is ``[cos | sin]`` of
  ``t * exp(-ln(10000) i / half)``: ``flip_sin_to_cos=True``, ``freq_shift=0``, over
  ``num_channels`` dimensions; then ``time_embed`` (linear, SiLU, linear; unet.py:470-475) =
  ``TimestepEmbedding``; the class embedding is added to it (unet.py:649-652) as ``UNet2DModel``'s
  ``class_embedding`` is (``num_class_embeds``).
- **ResBlock** (unet.py:143-256): GroupNorm(32, eps 1e-5), SiLU, [nearest ×2 / avg-pool ÷2 of both h
  and x for ``resblock_updown``], conv; ``emb_layers`` = SiLU + linear; scale-shift
  ``norm(h) * (1 + scale) + shift`` (``resnet_time_scale_shift="scale_shift"``) or ``h + emb``
  (``"default"``); 1×1 ``skip_connection`` where the channels change (diffusers' 1×1
  ``conv_shortcut``). ``resblock_updown`` → ``downsample_type``/``upsample_type="resnet"``
  (``ResnetDownsampleBlock2D``/``ResnetUpsampleBlock2D``); without it the conv ``Downsample``
  (stride 2, padding 1) / ``Upsample`` (nearest, conv) → ``"conv"`` (``DownBlock2D``/``UpBlock2D``).
- **attention**: ``AttentionBlock`` (unet.py:259-300) = GroupNorm, 1×1 conv1d qkv, attention,
  zero-init 1×1 conv1d proj, residual = diffusers' ``Attention`` (``group_norm``, ``to_q/k/v``,
  ``to_out.0``, residual). The middle block always has one; ``UNetMidBlock2D`` drops its GroupNorm
  unless ``attn_norm_num_groups`` is set when the resnets are ``scale_shift``
  (diffusers unet_2d_blocks.py ``UNetMidBlock2D``: ``attn_groups = resnet_groups if
  resnet_time_scale_shift == "default" else None``), hence ``attn_norm_num_groups=32`` as the script
  sets (:30).
- **skips**: ``input_blocks``' outputs (conv_in, each level's res blocks, its downsampler) are popped
  by ``output_blocks`` (unet.py:566-610, ``num_res_blocks + 1`` per level, the upsampler last) in the
  order ``UNet2DModel``'s up blocks consume ``down_block_res_samples``.
- **out**: GroupNorm, SiLU, conv (unet.py:612-616) = ``conv_norm_out``, ``conv_act``, ``conv_out``,
  all ``6`` channels of a learned-σ model kept (ε is the first 3, the variance interpolation the
  last 3: improved DDPM's ``learn_sigma``).
- **fp16**: ``use_fp16``/``convert_to_fp16`` (unet.py:618-632) only casts the torso at run time;
  the weights are the same. ``checkpoint.normalise`` upcasts float16/bfloat16 checkpoints to float32.

What ``UNet2DModel`` cannot express exactly, refused by ``ADMArch.check_expressible`` in one line:

- ``channel_mult[0] != 1`` (the 512² models' 0.5): ADM embeds t over ``num_channels`` dimensions and
  starts at ``channel_mult[0] * num_channels`` channels; ``UNet2DModel`` ties both to
  ``block_out_channels[0]``;
- attention layers of different head widths (one ``attention_head_dim`` for every block): a model
  with a fixed ``num_heads`` (``num_head_channels=-1``) at levels of different widths, e.g. ADM
  ImageNet 128 (``--num_heads 4`` at 32,16,8), or ``num_heads_upsample`` differing from
  ``num_heads``, unless every layer has one head (``attention_head_dim=None``);
- widths that are not multiples of 32 (the original's GroupNorm(32) refuses them too).

The presets (afhq-256, ffhq-256, imagenet-256) all fit: ``num_head_channels=64`` everywhere,
``channel_mult`` (1, 1, 2, 2, 4, 4). Exactness is tested against golden outputs of the original code
(``tests/data/imports/make_adm_golden.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pipeline.diffusion.imports.checkpoint import target_shapes
from pipeline.errors import ConfigError, ModelLoadError

GROUPS = 32  # guided_diffusion/nn.py:93-100 normalization(): GroupNorm32(32, channels), eps 1e-5

# create_model's channel_mult for each image size when none is given (guided_diffusion/
# script_util.py:148-158; the same in Asyrp models/improved_ddpm/script_util.py:63-74).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


@dataclass(frozen=True)
class ADMArch:
    """The architecture keys of guided-diffusion's ``create_model`` (script_util.py:130-147), as
    the published checkpoints' flags name them. ``attention_resolutions`` are image resolutions
    (``"32,16,8"``), not downsampling rates; ``channel_mult=()`` takes create_model's default for
    ``image_size`` (script_util.py:148-158); ``num_classes`` replaces ``class_cond`` (create_model
    uses 1000, script_util.py:8). ``dropout``, ``use_checkpoint`` and ``use_fp16`` change no weight:
    not keys here (``from_dict`` skips them)."""

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...] = ()
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    num_classes: int | None = None
    in_channels: int = 3
    source: str = field(default="", compare=False)  # where the keys come from, for the record

    def __post_init__(self):
        mult = tuple(self.channel_mult)
        if not mult:
            if self.image_size not in DEFAULT_CHANNEL_MULT:
                raise ConfigError(f"ADM image_size {self.image_size} has no default channel_mult "
                                  f"({', '.join(map(str, DEFAULT_CHANNEL_MULT))}); give channel_mult")
            mult = DEFAULT_CHANNEL_MULT[self.image_size]
        object.__setattr__(self, "channel_mult", mult)
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))

    @classmethod
    def from_dict(cls, keys: Mapping) -> ADMArch:
        """From explicit keys (``--arch adm``): lists or upstream's comma strings for the tuples,
        ``class_cond`` accepted for ``num_classes`` (1000, as create_model), ``dropout``,
        ``use_fp16``, ``use_checkpoint`` skipped: an upstream dict (AFHQ_DICT) is taken as it is.
        One-line errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        keys = {k: v for k, v in keys.items() if k not in ("dropout", "use_fp16", "use_checkpoint")}
        if "class_cond" in keys:
            cond = keys.pop("class_cond")
            keys.setdefault("num_classes", 1000 if cond else None)
        unknown = sorted(set(keys) - names)
        if unknown:
            raise ConfigError(f"unknown ADM architecture key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(names - {'source'}))}")
        for name in ("channel_mult", "attention_resolutions"):
            value = keys.get(name)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if value is not None:
                keys[name] = tuple(float(v) if name == "channel_mult" else int(v) for v in value)
        try:
            return cls(**keys)
        except TypeError as exc:
            raise ConfigError(f"ADM architecture: {exc}") from None

    # what the original builds from these keys (unet.py:396-616)
    @property
    def mults(self) -> tuple[float, ...]:
        return self.channel_mult

    @property
    def widths(self) -> list[int]:
        return [int(m * self.num_channels) for m in self.mults]

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def attention_levels(self) -> list[bool]:
        """Whether each level has attention: its downsampling rate ``ds`` is in
        ``image_size // res`` for ``res`` in attention_resolutions (script_util.py:162-164)."""
        rates = {self.image_size // int(r) for r in self.attention_resolutions}
        return [2**level in rates for level in range(len(self.mults))]

    def attention_widths(self) -> list[int]:
        """The widths of the levels with attention (down and up blocks alike)."""
        return [w for w, a in zip(self.widths, self.attention_levels(), strict=True) if a]

    def head_width(self) -> int | None:
        """The one head width of every attention layer, ``None`` when each has a single head
        (``UNet2DModel``'s ``attention_head_dim=None``); raises where they differ."""
        if self.num_head_channels != -1:
            return self.num_head_channels
        up_heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        if self.num_heads == 1 and up_heads == 1:
            return None
        layers = [(w, self.num_heads) for w in self.attention_widths()]
        layers += [(self.widths[-1], self.num_heads)]  # middle block
        layers += [(w, up_heads) for w in self.attention_widths()]
        head = {w // h for w, h in layers}
        if len(head) != 1:
            raise ModelLoadError(
                "UNet2DModel cannot express this ADM model exactly: its attention layers have head "
                f"widths {sorted(head)} (num_heads={self.num_heads}, num_heads_upsample="
                f"{self.num_heads_upsample}), UNet2DModel one attention_head_dim for all")
        return head.pop()

    def check_expressible(self) -> None:
        """One line naming what ``UNet2DModel`` cannot represent of these keys."""
        mults = self.mults
        if mults[0] != 1 or any(int(m * self.num_channels) != m * self.num_channels for m in mults):
            raise ModelLoadError(
                f"UNet2DModel cannot express this ADM model exactly: channel_mult {mults} must start "
                "at 1 (UNet2DModel embeds t over block_out_channels[0], ADM over num_channels)")
        bad = [w for w in [*self.widths, self.num_channels] if w % GROUPS]
        if bad:
            raise ModelLoadError(f"ADM widths must be multiples of {GROUPS} (GroupNorm32): {bad}")
        attention = [*self.attention_widths(), self.widths[-1]]
        if self.num_head_channels != -1 and any(w % self.num_head_channels for w in attention):
            raise ModelLoadError(f"ADM num_head_channels {self.num_head_channels} does not divide "
                                 f"the attention widths {attention}")
        self.head_width()


# The published files' keys. AFHQ and FFHQ (ILVR's afhq_dog_4m.pt / ffhq_10m.pt, CycleDiffusion's
# cat/wild_ema_0.9999_050000.pt): AFHQ_DICT, kwonminki/Asyrp_official
# models/improved_ddpm/script_util.py:5-22 (= ChenWu98/cycle-diffusion
# model/lib/ddpm_ddim/models/improved_ddpm/script_util.py:5-22); i_DDPM builds FFHQ from it too
# (:102-104). channel_mult "" → (1, 1, 2, 2, 4, 4) for 256 (:62-73). num_heads=4 is overridden by
# num_head_channels=64 (guided_diffusion/unet.py:277-283).
_AFHQ = dict(
    image_size=256, num_channels=128, num_res_blocks=1, channel_mult=(1, 1, 2, 2, 4, 4),
    attention_resolutions=(16,), num_heads=4, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
    learn_sigma=True, num_classes=None,
)
PRESETS: dict[str, ADMArch] = {
    "afhq-256": ADMArch(**_AFHQ, source="Asyrp_official models/improved_ddpm/script_util.py:5-22 AFHQ_DICT"),
    "ffhq-256": ADMArch(**_AFHQ, source="Asyrp_official models/improved_ddpm/script_util.py:5-22,102-104"),
    # ADM ImageNet 256 (256x256_diffusion.pt): openai/guided-diffusion README.md:63 MODEL_FLAGS
    # (= Asyrp IMAGENET_DICT, script_util.py:25-41; CycleDiffusion's copy says image_size=512 at :28).
    "imagenet-256": ADMArch(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(32, 16, 8), num_heads=4, num_head_channels=64, num_heads_upsample=-1,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
        learn_sigma=True, num_classes=1000, source="guided-diffusion README.md:63",
    ),
}


def preset(name: str) -> ADMArch:
    """The architecture of a published file, by preset name; one line listing them otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown ADM preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def unet_config(arch: ADMArch) -> dict:
    """The ``diffusers.UNet2DModel`` config of ``arch`` (keys as convert_consistency_to_diffusers.py
    :13-33 sets them, plus the embedding and norm keys spelled out)."""
    arch.check_expressible()
    attn = arch.attention_levels()
    if arch.resblock_updown:
        plain_down, plain_up, resample = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D", "resnet"
    else:
        plain_down, plain_up, resample = "DownBlock2D", "UpBlock2D", "conv"
    return {
        "sample_size": arch.image_size,
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,  # [cos | sin], nn.py:118
        "freq_shift": 0,  # exponent / half, nn.py:113-116
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "block_out_channels": arch.widths,
        "layers_per_block": arch.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": resample,
        "upsample_type": resample,
        "dropout": 0.0,
        "act_fn": "silu",
        "attention_head_dim": arch.head_width(),
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if arch.use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": arch.num_classes,
    }


def scheduler_config(arch: ADMArch, num_train_timesteps: int = 1000) -> dict:
    """The paper's linear β schedule, for diffusers' DDPMScheduler/DDIMScheduler ``from_config``:
    guided_diffusion/gaussian_diffusion.py:27-35 ``get_named_beta_schedule("linear")`` =
    linspace(1e-4, 0.02, 1000) scaled by 1000/T. ``variance_type`` records learned σ the way
    diffusers' DDPMScheduler reads 6-channel output (``learned_range``); DDIM ignores it."""
    scale = 1000 / num_train_timesteps
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": scale * 1e-4,
        "beta_end": scale * 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        # ᾱ after the last step is 1, as the official samplers step: guided-diffusion's alphas_cumprod_prev
        # starts with 1.0 (gaussian_diffusion.py:142), Asyrp's denoising_step takes at_next = 1 at t_next = -1
        # (utils/diffusion_utils.py:68-69)
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "variance_type": "learned_range" if arch.learn_sigma else "fixed_small",
    }




# -- the mapping ----------------------------------------------------------------------------------
# One rule per target group: (kind, source prefix, target prefix). Kinds: "copy" (same tensors),
# "resnet", "attention", "conv1d" (a 1×1 conv1d → linear).


def _resnet(src: str, dst: str, skip: bool) -> list[tuple[str, str]]:
    """convert_consistency_to_diffusers.py:123-139 (ResBlock, unet.py:182-218)."""
    pairs = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")]
    if skip:
        pairs.append(("skip_connection", "conv_shortcut"))
    return [(f"{src}.{a}.{p}", f"{dst}.{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _plan(arch: ADMArch) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(resnet/plain pairs source key → target key, attention blocks source → target prefix), walking
    the original's input_blocks / middle_block / output_blocks (unet.py:481-610) in the order of
    con_pt_to_diffuser (convert_consistency_to_diffusers.py:164-266)."""
    pairs = [("time_embed.0.weight", "time_embedding.linear_1.weight"),
             ("time_embed.0.bias", "time_embedding.linear_1.bias"),
             ("time_embed.2.weight", "time_embedding.linear_2.weight"),
             ("time_embed.2.bias", "time_embedding.linear_2.bias"),
             ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
             ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
             ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias")]
    if arch.num_classes is not None:
        pairs.append(("label_emb.weight", "class_embedding.weight"))
    attns: list[tuple[str, str]] = []
    widths, attn = arch.widths, arch.attention_levels()
    last = len(widths) - 1

    def resample(src: str, dst: str) -> None:
        if arch.resblock_updown:
            pairs.extend(_resnet(src, dst, skip=False))
        else:  # Downsample.op / Upsample.conv (unet.py:81-140) → Downsample2D.conv / Upsample2D.conv
            name = "op" if dst.startswith("down") else "conv"
            pairs.extend((f"{src}.{name}.{p}", f"{dst}.conv.{p}") for p in ("weight", "bias"))

    block, ch = 1, widths[0]
    for i, width in enumerate(widths):
        for j in range(arch.num_res_blocks):
            pairs.extend(_resnet(f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", skip=ch != width))
            if attn[i]:
                attns.append((f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}"))
            ch, block = width, block + 1
        if i != last:
            resample(f"input_blocks.{block}.0", f"down_blocks.{i}.downsamplers.0")
            block += 1
    pairs.extend(_resnet("middle_block.0", "mid_block.resnets.0", skip=False))
    attns.append(("middle_block.1", "mid_block.attentions.0"))
    pairs.extend(_resnet("middle_block.2", "mid_block.resnets.1", skip=False))
    block = 0
    for i, level in enumerate(reversed(range(len(widths)))):
        for j in range(arch.num_res_blocks + 1):
            pairs.extend(_resnet(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", skip=True))
            if attn[level]:
                attns.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}"))
            block += 1
        if level:  # the upsampler closes the level's last output block (unet.py:592-609)
            resample(f"output_blocks.{block - 1}.{2 if attn[level] else 1}", f"up_blocks.{i}.upsamplers.0")
    return pairs, attns


def source_shapes(arch: ADMArch) -> dict[str, tuple[int, ...]]:
    """Every key of the original state dict → its shape (what a published file of ``arch`` holds)."""
    return _source_shapes(arch, target_shapes(unet_config(arch)))[0]


def key_map(arch: ADMArch) -> dict[str, str]:
    """Every key of the original state dict → the diffusers key it fills (an attention's qkv fills three:
    ``to_q|to_k|to_v``); the record of an import."""
    pairs, attns = _plan(arch)
    mapped = dict(pairs)
    for src, dst in attns:
        mapped.update({f"{src}.norm.weight": f"{dst}.group_norm.weight", f"{src}.norm.bias": f"{dst}.group_norm.bias",
                       f"{src}.qkv.weight": f"{dst}.to_q|to_k|to_v.weight", f"{src}.qkv.bias": f"{dst}.to_q|to_k|to_v.bias",
                       f"{src}.proj_out.weight": f"{dst}.to_out.0.weight", f"{src}.proj_out.bias": f"{dst}.to_out.0.bias"})
    return mapped



def _fmt(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _source_shapes(arch: ADMArch, target: Mapping[str, tuple[int, ...]]) -> tuple[dict, list, list]:
    """What the original's state dict must hold (key → shape), derived from the target model's shapes."""
    pairs, attns = _plan(arch)
    expected = {src: target[dst] for src, dst in pairs}
    for src, dst in attns:
        width = target[f"{dst}.to_q.weight"][0]
        expected.update({
            f"{src}.norm.weight": target[f"{dst}.group_norm.weight"],
            f"{src}.norm.bias": target[f"{dst}.group_norm.bias"],
            f"{src}.qkv.weight": (3 * width, width, 1),
            f"{src}.qkv.bias": (3 * width,),
            f"{src}.proj_out.weight": (width, width, 1),
            f"{src}.proj_out.bias": (width,),
        })
    return expected, pairs, attns


def check(state_dict: Mapping[str, torch.Tensor], arch: ADMArch) -> None:
    """Every key the original model of ``arch`` has is in ``state_dict`` with its shape, and no other:
    raises ModelLoadError in one line naming the first missing / unexpected keys or the shape."""
    _check(state_dict, _source_shapes(arch, target_shapes(unet_config(arch)))[0])


def _check(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {', '.join(unexpected[:3])}")
        raise ModelLoadError(f"the checkpoint does not fit the ADM architecture: {'; '.join(parts)}")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != tuple(shape):
            raise ModelLoadError(f"the checkpoint does not fit the ADM architecture: {key} has shape "
                                 f"{_fmt(state_dict[key].shape)}, the architecture expects {_fmt(shape)}")


def _split_qkv(weight: torch.Tensor, bias: torch.Tensor, heads: int, legacy: bool):
    """q, k, v weights (C, C) and biases (C,) of a 1×1 conv1d qkv (3C, C, 1). Legacy order
    (QKVAttentionLegacy, unet.py:347): rows [q_h k_h v_h] per head h; new order (QKVAttention,
    unet.py:380): [q | k | v] (what convert_consistency_to_diffusers.py:143-144 chunks)."""
    width = weight.shape[1]
    w, b = weight.reshape(3 * width, width), bias
    if legacy and heads > 1:
        w = w.reshape(heads, 3, width // heads, width).transpose(0, 1).reshape(3 * width, width)
        b = b.reshape(heads, 3, width // heads).transpose(0, 1).reshape(3 * width)
    return [x.clone() for x in w.chunk(3, dim=0)], [x.clone() for x in b.chunk(3, dim=0)]


def convert(state_dict: Mapping[str, torch.Tensor], arch: ADMArch) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``UNet2DModel`` config, its state dict) of a guided-diffusion ``UNetModel`` state dict
    (``checkpoint.normalise`` it first). Exact: the converted model computes the original's output and middle
    block output (tests/unit/test_import_adm.py). Tensors are shared with ``state_dict`` where the
    mapping is a rename, so peak memory stays near one copy of the weights."""
    config = unet_config(arch)
    target = target_shapes(config)  # built once: the source's shapes and the result's check both read it
    expected, pairs, attns = _source_shapes(arch, target)
    _check(state_dict, expected)
    out: dict[str, torch.Tensor] = {dst: state_dict[src] for src, dst in pairs}
    head_width = config["attention_head_dim"]
    for src, dst in attns:
        qkv_w, qkv_b = state_dict[f"{src}.qkv.weight"], state_dict[f"{src}.qkv.bias"]
        width = qkv_w.shape[1]
        heads = 1 if head_width is None else width // head_width
        (q, k, v), (qb, kb, vb) = _split_qkv(qkv_w, qkv_b, heads, legacy=not arch.use_new_attention_order)
        out.update({
            f"{dst}.group_norm.weight": state_dict[f"{src}.norm.weight"],
            f"{dst}.group_norm.bias": state_dict[f"{src}.norm.bias"],
            f"{dst}.to_q.weight": q, f"{dst}.to_q.bias": qb,
            f"{dst}.to_k.weight": k, f"{dst}.to_k.bias": kb,
            f"{dst}.to_v.weight": v, f"{dst}.to_v.bias": vb,
            f"{dst}.to_out.0.weight": state_dict[f"{src}.proj_out.weight"].squeeze(-1),
            f"{dst}.to_out.0.bias": state_dict[f"{src}.proj_out.bias"],
        })
    unfilled = [k for k in target if k not in out]
    extra = [k for k in out if k not in target]
    wrong = [k for k in target if k in out and tuple(out[k].shape) != tuple(target[k])]
    if unfilled or extra or wrong:  # a bug of this mapping, not of the checkpoint
        raise ModelLoadError(f"ADM mapping incomplete: unfilled {unfilled[:3]}, extra {extra[:3]}, "
                             f"shape {wrong[:3]}")
    return config, out
