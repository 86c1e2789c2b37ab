"""ADM / improved-DDPM checkpoints onto diffusers' UNet2DModel (pipeline/diffusion/imports/adm.py),
held against golden outputs of the ORIGINAL guided-diffusion ``UNetModel``
(tests/data/imports/make_adm_golden.py made them; ``adm-tiny``: the AFHQ/FFHQ switches,
``adm-tiny-cond``: class-conditional like ImageNet)."""

from __future__ import annotations

import json
import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from pipeline.diffusion.imports import adm
from pipeline.diffusion.imports.checkpoint import normalise
from pipeline.errors import ConfigError, ModelLoadError

DATA = Path(__file__).resolve().parents[1] / "data" / "imports"
GOLDEN = ["adm-tiny", "adm-tiny-cond"]


@cache
def golden(name: str) -> tuple[dict, adm.ADMArch]:
    return load_file(str(DATA / f"{name}.safetensors")), adm.ADMArch.from_dict(
        json.loads((DATA / f"{name}.json").read_text()))


def state(name: str) -> dict[str, torch.Tensor]:
    return normalise(golden(name)[0], prefix="model.")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run(config: dict, weights: dict, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model = UNet2DModel(**config).eval()
    model.load_state_dict(weights, strict=True)
    captured = {}
    model.mid_block.register_forward_hook(lambda _m, _i, o: captured.setdefault("h", o))
    with torch.no_grad():
        out = model(data["input.x_t"], data["input.t"], class_labels=data.get("input.y")).sample
    return out, captured["h"]


@pytest.mark.parametrize("name", GOLDEN)
def test_the_converted_model_computes_the_originals_eps_and_h(name):
    data, arch = golden(name)
    assert data["model.out.2.weight"].shape[0] == 6 and arch.learn_sigma
    assert ("input.y" in data) == (arch.num_classes is not None)
    config, weights = adm.convert(state(name), arch)
    out, h = run(config, weights, data)
    assert out.shape == data["expected.out"].shape == (2, 6, 16, 16)  # ε and the σ interpolation
    assert rel(out, data["expected.out"]) < 1e-4
    assert rel(out[:, :3], data["expected.out"][:, :3]) < 1e-4  # ε
    assert h.shape == data["expected.h"].shape and rel(h, data["expected.h"]) < 1e-4
    assert data["expected.out"].abs().max() > 0.1  # the golden is not the zero-init's trivial 0


@pytest.mark.parametrize("name", GOLDEN)
def test_the_head_order_matters(name):
    """The legacy qkv order (heads first) is what makes the golden match: read as the new order
    (q | k | v, as the consistency-models script chunks it) the output is wrong."""
    data, arch = golden(name)
    wrong = adm.ADMArch.from_dict({**json.loads((DATA / f"{name}.json").read_text()),
                                   "use_new_attention_order": True})
    assert arch.head_width() == 16  # 2 heads at 32 channels
    out, _ = run(*adm.convert(state(name), wrong), data)
    assert rel(out, data["expected.out"]) > 0.01


@pytest.mark.parametrize("name", GOLDEN)
def test_every_source_key_consumed_and_every_target_key_filled(name):
    data, arch = golden(name)
    source = state(name)
    adm.check(source, arch)
    config, weights = adm.convert(source, arch)
    with torch.device("meta"):
        target = UNet2DModel(**config).state_dict()
    assert set(weights) == set(target)
    assert all(weights[k].shape == target[k].shape for k in target)
    assert sum(v.numel() for v in weights.values()) == sum(v.numel() for v in source.values())
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_normalise_accepts_the_shapes_published_files_come_in():
    plain = state("adm-tiny")
    half = {k: v.half() for k, v in plain.items()}
    variants = [
        plain,
        {"state_dict": plain},
        [plain, {"step": torch.tensor(3)}],
        ({"state_dict": plain},),
        {f"module.{k}": v for k, v in plain.items()},
        {"state_dict": {f"module.{k}": v for k, v in half.items()}},
        half,
    ]
    for variant in variants:
        got = normalise(variant)
        assert set(got) == set(plain)
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], plain[k]) for k in plain)
    # the golden stores float16 weights behind "model.": what the original ran with, in float32
    assert all(v.dtype == torch.float16 for k, v in golden("adm-tiny")[0].items() if k.startswith("model."))


@pytest.mark.parametrize("bad", [42, {"state_dict": {"a": torch.zeros(1), "epoch": 3}}, {}])
def test_normalise_refuses_what_is_not_a_state_dict_in_one_line(bad):
    with pytest.raises(ModelLoadError, match="not a state dict") as err:
        normalise(bad)
    assert "\n" not in str(err.value)


def test_a_missing_key_is_one_line_naming_it():
    source = state("adm-tiny-cond")
    del source["middle_block.1.qkv.weight"]
    with pytest.raises(ModelLoadError) as err:
        adm.convert(source, golden("adm-tiny-cond")[1])
    msg = str(err.value)
    assert "\n" not in msg and "1 missing key(s), first middle_block.1.qkv.weight" in msg


def test_an_unexpected_key_is_one_line_naming_it():
    source = state("adm-tiny")  # unconditional: label_emb is not part of it
    source["label_emb.weight"] = torch.zeros(10, 128)
    with pytest.raises(ModelLoadError) as err:
        adm.check(source, golden("adm-tiny")[1])
    assert "\n" not in str(err.value) and "unexpected key(s), first label_emb.weight" in str(err.value)


def test_a_wrong_shape_is_one_line_naming_the_key_and_both_shapes():
    source = state("adm-tiny")
    source["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ModelLoadError) as err:
        adm.convert(source, golden("adm-tiny")[1])
    assert str(err.value).endswith(
        "input_blocks.1.0.in_layers.2.weight has shape (32, 32, 1, 1), the architecture expects (32, 32, 3, 3)")


def test_a_checkpoint_of_another_preset_does_not_fit():
    with pytest.raises(ModelLoadError, match="does not fit the ADM architecture"):
        adm.check(state("adm-tiny"), golden("adm-tiny-cond")[1])


def test_a_torch_save_pickle_loads_with_weights_only(tmp_path):
    """How the import command loads a published .pt: torch.load(weights_only=True)."""
    path = tmp_path / "ema_0.9999.pt"
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in state("adm-tiny-cond").items()}}, path)
    source = normalise(torch.load(path, map_location="cpu", weights_only=True))
    data, arch = golden("adm-tiny-cond")
    out, _ = run(*adm.convert(source, arch), data)
    assert rel(out, data["expected.out"]) < 1e-4


class Payload:
    """Unpickling this runs code: it touches a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_pickle_that_needs_more_than_weights_only_is_refused_unexecuted(tmp_path):
    path, touched = tmp_path / "evil.pt", tmp_path / "executed"
    torch.save({"state_dict": state("adm-tiny"), "extra": Payload(str(touched))}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not touched.exists()


def test_the_presets_hold_the_issues_settings():
    afhq, ffhq, imagenet = (adm.preset(n) for n in ("afhq-256", "ffhq-256", "imagenet-256"))
    assert afhq == ffhq
    for arch in (afhq, ffhq):
        assert (arch.image_size, arch.num_channels, arch.num_res_blocks) == (256, 128, 1)
        assert arch.attention_resolutions == (16,) and arch.num_head_channels == 64
        assert arch.resblock_updown and arch.use_scale_shift_norm and arch.learn_sigma
        assert arch.num_classes is None and not arch.use_new_attention_order
        assert arch.mults == adm.DEFAULT_CHANNEL_MULT[256] == (1, 1, 2, 2, 4, 4)
        assert arch.attention_levels() == [False, False, False, False, True, False]
    assert (imagenet.image_size, imagenet.num_channels, imagenet.num_res_blocks) == (256, 256, 2)
    assert imagenet.attention_resolutions == (32, 16, 8) and imagenet.num_head_channels == 64
    assert imagenet.num_classes == 1000 and imagenet.learn_sigma and imagenet.resblock_updown
    assert imagenet.attention_levels() == [False, False, False, True, True, True]
    # the upstream flag strings give the same keys (guided-diffusion README.md:63)
    flags = dict(attention_resolutions="32,16,8", class_cond=True, image_size=256, learn_sigma=True,
                 num_channels=256, num_head_channels=64, num_heads=4, num_res_blocks=2,
                 resblock_updown=True, use_scale_shift_norm=True, channel_mult="")
    assert adm.ADMArch.from_dict(flags) == imagenet
    # AFHQ_DICT verbatim (Asyrp models/improved_ddpm/script_util.py:5-22)
    afhq_dict = dict(attention_resolutions="16", class_cond=False, dropout=0.0, image_size=256,
                     learn_sigma=True, num_channels=128, num_head_channels=64, num_res_blocks=1,
                     resblock_updown=True, use_fp16=False, use_scale_shift_norm=True, num_heads=4,
                     num_heads_upsample=-1, channel_mult="", use_checkpoint=False,
                     use_new_attention_order=False)
    assert adm.ADMArch.from_dict(afhq_dict) == afhq


@pytest.mark.parametrize("name", ["afhq-256", "ffhq-256", "imagenet-256"])
def test_a_full_size_checkpoint_of_each_preset_fits_and_converts(name):
    """The original model of each preset (its keys and shapes, recorded from create_model with the
    upstream flags in adm-preset-shapes.json) is exactly what check() expects, and converts to a
    UNet2DModel state dict with every key filled (meta tensors: no memory)."""
    shapes = json.loads((DATA / "adm-preset-shapes.json").read_text())
    original = shapes["afhq-256" if name == "ffhq-256" else name]
    arch = adm.preset(name)
    expected = adm.source_shapes(arch)
    assert {k: list(v) for k, v in expected.items()} == original
    source = {k: torch.empty(s, device="meta") for k, s in original.items()}
    config, weights = adm.convert(source, arch)
    with torch.device("meta"):
        target = UNet2DModel(**config).state_dict()
    assert set(weights) == set(target) and all(weights[k].shape == target[k].shape for k in target)


@pytest.mark.parametrize("name,params", [("afhq-256", None), ("imagenet-256", (540e6, 560e6))])
def test_each_preset_builds_a_unet2dmodel(name, params):
    config = adm.unet_config(adm.preset(name))
    assert config["out_channels"] == 6 and config["attention_head_dim"] == 64
    assert config["resnet_time_scale_shift"] == "scale_shift" and config["flip_sin_to_cos"]
    assert config["freq_shift"] == 0 and config["attn_norm_num_groups"] == 32
    with torch.device("meta"):
        model = UNet2DModel(**config)
    count = sum(p.numel() for p in model.parameters())
    if params:  # "the 550 M-parameter ImageNet model" (issue 26)
        assert params[0] < count < params[1]
        assert model.class_embedding.num_embeddings == 1000


@pytest.mark.parametrize("name", list(adm.PRESETS))
def test_the_scheduler_is_the_papers_linear_schedule(name):
    config = adm.scheduler_config(adm.preset(name))
    paper = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    for cls in (DDIMScheduler, DDPMScheduler):
        sched = cls.from_config(config)
        assert sched.config.num_train_timesteps == 1000
        np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), paper, rtol=1e-5, atol=0)
    assert DDPMScheduler.from_config(config).config.variance_type == "learned_range"


def test_unknown_preset_and_keys_are_one_line():
    with pytest.raises(ConfigError, match="unknown ADM preset 'afhq'; presets: afhq-256, ffhq-256, imagenet-256"):
        adm.preset("afhq")
    with pytest.raises(ConfigError, match="unknown ADM architecture key.*num_chanels"):
        adm.ADMArch.from_dict({"image_size": 256, "num_chanels": 128, "num_res_blocks": 1})


def test_what_unet2dmodel_cannot_express_is_refused_in_one_line():
    # the 512² models' channel_mult starts at 0.5 (script_util.py:149-150)
    with pytest.raises(ModelLoadError, match="channel_mult .* must start at 1"):
        adm.unet_config(adm.ADMArch(image_size=512, num_channels=256, num_res_blocks=2,
                                    attention_resolutions=(32, 16, 8), num_head_channels=64))
    # ImageNet 128: num_heads=4 at widths 512, 768, 1024 (guided-diffusion README.md:56)
    with pytest.raises(ModelLoadError, match="head widths \\[128, 192, 256\\]"):
        adm.unet_config(adm.ADMArch(image_size=128, num_channels=256, num_res_blocks=2,
                                    attention_resolutions=(32, 16, 8), num_heads=4))


@pytest.mark.parametrize("keys", [
    # no resblock_updown (conv resampling), no scale-shift, the new attention order, 3 levels
    dict(channel_mult=(1, 2, 2), resblock_updown=False, use_scale_shift_norm=False,
         use_new_attention_order=True, num_head_channels=32, attention_resolutions=(8, 4)),
    # one head everywhere at different widths: attention_head_dim=None
    dict(channel_mult=(1, 2), num_heads=1, attention_resolutions=(16,), num_res_blocks=2, num_classes=5),
])
def test_other_switches_map_every_key(keys):
    """Not golden-checked (the golden files cover the published switches): the mapping of these
    switches fills every key of the UNet2DModel with the shape it needs."""
    arch = adm.ADMArch(**{"image_size": 16, "num_channels": 32, "num_res_blocks": 1, **keys})
    expected = adm.source_shapes(arch)
    gen = torch.Generator().manual_seed(0)
    source = {k: torch.randn(s, generator=gen) for k, s in expected.items()}
    config, weights = adm.convert(source, arch)
    model = UNet2DModel(**config).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        y = torch.tensor([1]) if arch.num_classes else None
        assert model(torch.randn(1, 3, 16, 16), torch.tensor([5]), class_labels=y).sample.shape == (1, 3, 16, 16)
