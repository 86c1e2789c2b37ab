"""Make the ADM golden files ``adm-tiny.safetensors`` and ``adm-tiny-cond.safetensors`` from the
ORIGINAL code: openai/guided-diffusion at commit 22e0df8183507e13a7813f8d38d51b072ca1e67c,
``guided_diffusion/unet.py`` ``UNetModel`` (class at unet.py:396, forward at unet.py:634-663,
``middle_block`` at unet.py:539-561), the class the published ADM / improved-DDPM checkpoints
(ILVR's AFHQ-dog and FFHQ, CycleDiffusion's AFHQ cat and wild, ADM ImageNet) were saved from.

Not run by the tests (it needs the upstream code); it documents how the data was made::

    git clone https://github.com/openai/guided-diffusion /tmp/ref-guided-diffusion
    python tests/data/imports/make_adm_golden.py /tmp/ref-guided-diffusion tests/data/imports

Each file holds (safetensors, one flat dict):

- ``model.<key>``: the original ``UNetModel.state_dict()``, keys exactly as the original names them
  behind a ``model.`` prefix. Stored as **float16** to keep each file well under 1 MB (GroupNorm's 32
  groups make 32 channels the smallest width the original allows); the model that produced the
  expected outputs ran with exactly these values upcast to float32 (the random init is rounded to
  float16 first), so the golden is exact for the float32 weights the test loads.
- ``input.x_t`` (float32, [2, 3, 16, 16]), ``input.t`` (float32, [2], integral timesteps) and, for
  the class-conditional model, ``input.y`` (int64, [2]);
- ``expected.out``: the model's whole float32 output, all 6 channels (learned σ: ε is the first 3);
- ``expected.h``: the output of ``middle_block`` (h-space), captured with a forward hook.

``adm-preset-shapes.json``: every key and shape of the original model of the afhq-256 (= ffhq-256)
and imagenet-256 presets, built by ``create_model`` from the upstream flags on the meta device: the
full-size key layout (2 res blocks, 6 levels, attention at 3 levels, 1000 classes) the converter's
accounting is held against.

Every parameter is drawn at random (not the original init, whose ``zero_module`` output convs would
make the output trivially zero). The architecture keys are those of
``guided_diffusion/script_util.py`` ``create_model`` (script_util.py:130-184), which builds the
model here, written next to each file as ``<name>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# The architecture keys of pipeline.diffusion.imports.adm.ADMArch (create_model's, script_util.py:
# 130-147, with attention_resolutions and channel_mult as tuples and num_classes for class_cond).
CONFIGS = {
    # The AFHQ/FFHQ switches (AFHQ_DICT, Asyrp models/improved_ddpm/script_util.py:5-22): learned σ,
    # resblock_updown, scale-shift norm, num_head_channels, legacy attention order; 1 res block.
    # Attention at 16 (= level 0, 2 heads of 16) so a down/up block with attention and a resnet
    # down/upsampler are covered. Two levels of 32 channels: the smallest the original allows.
    "adm-tiny": dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 1),
        attention_resolutions=(16,), num_heads=4, num_head_channels=16, num_heads_upsample=-1,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
        learn_sigma=True, num_classes=None,
    ),
    # The ImageNet switches (guided-diffusion README.md:63): class-conditional, the same learned σ /
    # resblock_updown / scale-shift / head channels. Attention at 8 (level 1, with the middle
    # block's). 1 res block, not ImageNet's 2: 2 would take the file over 1 MB.
    "adm-tiny-cond": dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 1),
        attention_resolutions=(8,), num_heads=4, num_head_channels=16, num_heads_upsample=-1,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
        learn_sigma=True, num_classes=10,
    ),
}


# The presets' flags as upstream spells them, for adm-preset-shapes.json: AFHQ_DICT (Asyrp
# models/improved_ddpm/script_util.py:5-22, also FFHQ's, :102-104) and the ADM ImageNet 256 flags
# (guided-diffusion README.md:63; Asyrp's IMAGENET_DICT, script_util.py:25-41).
PRESET_FLAGS = {
    "afhq-256": dict(attention_resolutions="16", class_cond=False, image_size=256, learn_sigma=True,
                     num_channels=128, num_head_channels=64, num_res_blocks=1, resblock_updown=True,
                     use_scale_shift_norm=True, num_heads=4, num_heads_upsample=-1, channel_mult="",
                     use_new_attention_order=False),
    "imagenet-256": dict(attention_resolutions="32,16,8", class_cond=True, image_size=256,
                         learn_sigma=True, num_channels=256, num_head_channels=64, num_res_blocks=2,
                         resblock_updown=True, use_scale_shift_norm=True, num_heads=4,
                         num_heads_upsample=-1, channel_mult="", use_new_attention_order=False),
}


def preset_shapes(script_util) -> dict[str, dict[str, list[int]]]:
    """Every state-dict key and shape of the original model of each preset, built on the meta
    device (no weights): what a published file of that preset holds."""
    script_util.NUM_CLASSES = 1000
    shapes = {}
    for name, flags in PRESET_FLAGS.items():
        with torch.device("meta"):
            model = script_util.create_model(**flags)
        shapes[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    return shapes


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter at random, of a scale that keeps activations O(1); rounded to float16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:  # GroupNorm weight
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                v = torch.randn(p.shape, generator=gen) / fan_in**0.5
            p.copy_(v.half().float())


def make(upstream: Path, out_dir: Path) -> None:
    sys.path.insert(0, str(upstream))
    from guided_diffusion import script_util

    for seed, (name, arch) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        kwargs = dict(arch)
        kwargs["channel_mult"] = ",".join(str(m) for m in arch["channel_mult"])
        kwargs["attention_resolutions"] = ",".join(str(r) for r in arch["attention_resolutions"])
        kwargs["class_cond"] = kwargs.pop("num_classes") is not None
        # create_model takes the class count from this module constant (script_util.py:8)
        script_util.NUM_CLASSES = arch["num_classes"] or 1000
        model = script_util.create_model(dropout=0.0, use_fp16=False, **kwargs).eval()
        randomise(model, seed=1000 + seed)
        gen = torch.Generator().manual_seed(2000 + seed)
        x_t = torch.randn(2, 3, 16, 16, generator=gen)
        t = torch.tensor([17.0, 803.0])
        y = torch.tensor([3, 7]) if arch["num_classes"] else None
        captured = {}
        hook = model.middle_block.register_forward_hook(lambda _m, _i, o, c=captured: c.setdefault("h", o))
        with torch.no_grad():
            out = model(x_t, t, y=y)
        hook.remove()
        tensors = {f"model.{k}": v.half().contiguous() for k, v in model.state_dict().items()}
        tensors.update({"input.x_t": x_t, "input.t": t, "expected.out": out.contiguous(),
                        "expected.h": captured["h"].contiguous()})
        if y is not None:
            tensors["input.y"] = y
        save_file(tensors, str(out_dir / f"{name}.safetensors"),
                  metadata={"source": "openai/guided-diffusion@22e0df8 guided_diffusion/unet.py UNetModel"})
        (out_dir / f"{name}.json").write_text(json.dumps(arch, indent=1) + "\n")
        print(name, sum(p.numel() for p in model.parameters()), "parameters;",
              "out", tuple(out.shape), "h", tuple(captured["h"].shape))
    shapes = preset_shapes(script_util)
    (out_dir / "adm-preset-shapes.json").write_text(json.dumps(shapes, separators=(",", ":")) + "\n")
    print("presets", {name: len(keys) for name, keys in shapes.items()}, "keys")


def full_size_check(upstream: Path) -> None:
    """Not data: the original afhq-256 model (at 256²) and imagenet-256 model (at 64², class 207)
    with random weights against their conversion (run from the repo root with ``--full-size``;
    about a minute on CPU). Printed max abs / relative errors of the output and h."""
    sys.path.insert(0, str(upstream))
    from diffusers import UNet2DModel
    from guided_diffusion import script_util

    from pipeline.diffusion.imports import adm

    script_util.NUM_CLASSES = 1000
    for name, size in [("afhq-256", 256), ("imagenet-256", 64)]:
        original = script_util.create_model(**PRESET_FLAGS[name]).eval()
        randomise(original, 7)
        got = {}
        original.middle_block.register_forward_hook(lambda _m, _i, o, g=got: g.setdefault("ref", o))
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        t, y = torch.tensor([421.0]), (torch.tensor([207]) if "imagenet" in name else None)
        with torch.no_grad():
            ref = original(x, t, y=y)
        config, weights = adm.convert(adm.normalise(original.state_dict()), adm.preset(name))
        model = UNet2DModel(**config).eval()
        model.load_state_dict(weights, strict=True)
        model.mid_block.register_forward_hook(lambda _m, _i, o, g=got: g.setdefault("h", o))
        with torch.no_grad():
            out = model(x, t, class_labels=y).sample
        for what, a, b in [("out", out, ref), ("h", got["h"], got["ref"])]:
            err = (a - b).abs().max().item()
            print(name, size, what, "max abs", err, "rel", err / b.abs().max().item())


if __name__ == "__main__":
    if sys.argv[1] == "--full-size":
        full_size_check(Path(sys.argv[2]))
    else:
        make(Path(sys.argv[1]), Path(sys.argv[2]))
