"""The DDPM import (``pipeline/diffusion/imports/ddpm.py``) held against the ORIGINAL network: golden
outputs of ermongroup/ddim ``models/diffusion.py`` ``Model`` on a tiny random instance
(``tests/data/imports/ddpm-tiny.safetensors``, made by ``make_ddpm_golden.py`` next to it, arch keys in
``ddpm-tiny.json``). The converted ``UNet2DModel`` must give the same ε and the same h (``mid.block_2``'s
output) to 1e-4 relative in float32; plus the key/shape accounting, the shapes published files come in,
safe loading, and the presets' schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.diffusion.imports import ddpm
from pipeline.diffusion.imports.checkpoint import normalise, target_shapes
from pipeline.errors import ConfigError, ModelLoadError

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "imports"
GOLDEN = DATA / "ddpm-tiny.safetensors"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def original(golden) -> dict[str, torch.Tensor]:
    """The state dict as the original names it (stored under ``model.``; float16 values that are exactly
    the float32 weights the golden outputs were computed with)."""
    return {k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def arch() -> ddpm.DDPMArch:
    return ddpm.DDPMArch.from_dict(json.loads((DATA / "ddpm-tiny.json").read_text()))


@pytest.fixture(scope="module")
def converted(original, arch):
    return ddpm.convert(normalise(original), arch)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_golden_file_is_small_float32_and_complete(golden, original):
    assert GOLDEN.stat().st_size < 1_500_000
    for name in ("x_t", "eps", "h"):
        assert golden[name].dtype == torch.float32
    assert golden["t"].tolist() == [17, 803]
    assert golden["eps"].shape == (2, 3, 16, 16) and golden["h"].shape == (2, 64, 8, 8)
    assert len(original) == len(golden) - 4 == 144


def test_converted_unet_reproduces_the_original_eps_and_h(golden, converted):
    from diffusers import UNet2DModel

    config, state = converted
    unet = UNet2DModel(**config).eval()
    result = unet.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    captured = {}
    hook = unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out))
    with torch.no_grad():
        eps = unet(golden["x_t"], golden["t"]).sample
    hook.remove()
    assert eps.shape == golden["eps"].shape
    assert _rel(eps, golden["eps"]) < TOL
    assert _rel(captured["h"], golden["h"]) < TOL
    # and not by accident: another timestep gives another ε
    with torch.no_grad():
        other = unet(golden["x_t"], golden["t"] + 100).sample
    assert _rel(other, golden["eps"]) > 1e-2


@pytest.mark.parametrize("change", [{"flip_sin_to_cos": True}, {"freq_shift": 0}, {"downsample_padding": 1}])
def test_the_golden_data_sees_the_time_embedding_and_the_padding(golden, converted, change):
    """The golden ε is sensitive to the details a wrong mapping would get wrong (the GroupNorm ε, 1e-6
    against diffusers' default 1e-5, moves ε by ~4e-5 relative only: ``test_the_mapping_details`` pins it)."""
    from diffusers import UNet2DModel

    config, state = converted
    unet = UNet2DModel(**{**config, **change}).eval()
    unet.load_state_dict(state, strict=True)
    with torch.no_grad():
        eps = unet(golden["x_t"], golden["t"]).sample
    assert _rel(eps, golden["eps"]) > 100 * TOL


def test_every_source_key_consumed_and_every_target_key_filled(original, arch, converted):
    config, state = converted
    mapping = ddpm.key_map(arch)
    assert set(mapping) == set(original)
    assert {dst for dst, _ in mapping.values()} == set(state)
    assert len(state) == len(original)
    targets = target_shapes(config)
    assert set(targets) == set(state)
    assert all(tuple(state[k].shape) == targets[k] for k in targets)
    for src, (dst, _) in mapping.items():  # values moved, never altered
        assert torch.equal(state[dst].flatten(), original[src].float().flatten())


def test_the_mapping_details(arch):
    config = ddpm.unet_config(arch)
    assert config["flip_sin_to_cos"] is False and config["freq_shift"] == 1
    assert config["norm_eps"] == 1e-6 and config["norm_num_groups"] == 32
    assert config["downsample_padding"] == 0 and config["attention_head_dim"] is None
    assert config["down_block_types"] == ["AttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "AttnUpBlock2D"]
    assert config["block_out_channels"] == [32, 64] and config["layers_per_block"] == 1
    mapping = ddpm.key_map(arch)
    assert mapping["up.1.block.0.conv1.weight"][0] == "up_blocks.0.resnets.0.conv1.weight"
    assert mapping["up.0.attn.1.proj_out.weight"][0] == "up_blocks.1.attentions.1.to_out.0.weight"
    assert mapping["mid.block_2.temb_proj.bias"][0] == "mid_block.resnets.1.time_emb_proj.bias"
    assert mapping["down.1.block.0.nin_shortcut.weight"][0] == "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert mapping["down.0.downsample.conv.weight"][0] == "down_blocks.0.downsamplers.0.conv.weight"
    assert mapping["up.1.upsample.conv.bias"][0] == "up_blocks.0.upsamplers.0.conv.bias"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "list", "tuple", "module", "float32"])
def test_normalise_accepts_the_shapes_published_files_come_in(original, wrap):
    plain = {k: v.float() for k, v in original.items()}
    obj = {
        "plain": original,  # float16, as stored
        "state_dict": {"state_dict": original, "epoch": 3},
        "list": [original, {"optimizer": 1}, 5, 100],
        "tuple": (original,),
        "module": {f"module.{k}": v for k, v in original.items()},
        "float32": plain,
    }[wrap]
    got = normalise(obj)
    assert list(got) == list(plain)
    assert all(v.dtype == torch.float32 and torch.equal(v, plain[k]) for k, v in got.items())


def test_normalise_takes_ddims_ema_item_when_asked(original):
    ema = {k: v.float() + 1 for k, v in original.items()}
    got = normalise([{f"module.{k}": v for k, v in original.items()}, {}, 1, 2, ema], item=-1)
    assert torch.equal(got["conv_in.weight"], ema["conv_in.weight"])


@pytest.mark.parametrize("obj, words", [
    ([], "empty list"),
    ("weights", "holds a str"),
    ({"conv_in.weight": 3}, "'conv_in.weight' is a int"),
])
def test_normalise_refuses_what_is_not_a_state_dict(obj, words):
    with pytest.raises(ModelLoadError, match=words):
        normalise(obj)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_missing_key_is_named_in_one_line(original, arch):
    broken = dict(normalise(original))
    del broken["mid.attn_1.q.weight"]
    with pytest.raises(ModelLoadError) as excinfo:
        ddpm.convert(broken, arch)
    message = _one_line(excinfo)
    assert "1 key(s) missing: mid.attn_1.q.weight" in message


def test_an_unexpected_key_is_named_in_one_line(original, arch):
    bayesian = dict(normalise(original), logvar=torch.zeros(1000))  # model.type "bayesian"
    with pytest.raises(ModelLoadError) as excinfo:
        ddpm.convert(bayesian, arch)
    assert "1 unexpected: logvar" in _one_line(excinfo)


def test_a_wrong_shape_is_named_in_one_line(original, arch):
    broken = dict(normalise(original))
    broken["up.0.block.1.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ModelLoadError) as excinfo:
        ddpm.convert(broken, arch)
    assert "up.0.block.1.conv2.weight has shape (32, 32, 1, 1), expected (32, 32, 3, 3)" in _one_line(excinfo)


def test_a_checkpoint_of_another_preset_does_not_fit(original):
    with pytest.raises(ModelLoadError) as excinfo:
        ddpm.check(normalise(original), ddpm.preset("celeba-hq-256"))
    message = _one_line(excinfo)
    assert "missing" in message and "(+" in message  # the first few, then a count


def test_a_torch_save_pickle_loads_with_weights_only(tmp_path, original, arch, golden):
    path = tmp_path / "celeba_hq.ckpt"
    torch.save([{f"module.{k}": v for k, v in original.items()}, {"step": 1}, 3, 4], path)
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    config, state = ddpm.convert(normalise(loaded), arch)
    assert torch.equal(state["conv_in.weight"], original["conv_in.weight"].float())


class NotATensor:
    """Any object a weights-only load does not know."""

    def __init__(self):
        self.payload = "would need arbitrary code"


def test_a_pickle_that_needs_more_than_weights_is_refused(tmp_path, original):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(original), "extra": NotATensor()}, path)
    with pytest.raises(Exception) as excinfo:  # pickle.UnpicklingError, as torch raises it
        torch.load(path, weights_only=True, map_location="cpu")
    assert "weights_only" in str(excinfo.value) or "Weights only" in str(excinfo.value)


@pytest.mark.parametrize("name", ["celeba-hq-256", "lsun-church-256", "lsun-bedroom-256"])
def test_presets_are_the_published_settings(name):
    arch = ddpm.preset(name)
    assert (arch.resolution, arch.ch, arch.ch_mult, arch.num_res_blocks) == (256, 128, (1, 1, 2, 2, 4, 4), 2)
    assert arch.attn_resolutions == (16,) and arch.dropout == 0.0 and arch.resamp_with_conv
    assert (arch.in_channels, arch.out_ch, arch.var_type) == (3, 3, "fixedsmall")
    assert (arch.beta_schedule, arch.beta_start, arch.beta_end, arch.num_diffusion_timesteps) == ("linear", 1e-4, 0.02, 1000)
    config = ddpm.unet_config(arch)
    assert config["block_out_channels"] == [128, 128, 256, 256, 512, 512]
    # attention at 16: the fifth level (256 / 2**4), in both paths
    assert config["down_block_types"] == ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4
    shapes = target_shapes(config)
    mapping = ddpm.key_map(arch)
    assert {dst for dst, _ in mapping.values()} == set(shapes)
    # ~114 M parameters (Asyrp / SDEdit's 256² DDPM)
    assert 100e6 < sum(int(np.prod(s)) for _, s in mapping.values()) < 130e6


@pytest.mark.parametrize("kind", ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("name", sorted(ddpm.PRESETS))
def test_scheduler_alphas_cumprod_is_the_papers_linear_schedule(kind, name):
    import diffusers

    scheduler = getattr(diffusers, kind).from_config(ddpm.scheduler_config(ddpm.preset(name)))
    want = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    got = scheduler.alphas_cumprod.double().numpy()
    assert got.shape == (1000,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.clip_sample is False
    if kind == "DDIMScheduler":
        assert scheduler.final_alpha_cumprod.item() == 1.0


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="celeba-hq-256, lsun-bedroom-256, lsun-church-256"):
        ddpm.preset("celeba-256")


@pytest.mark.parametrize("keys, words", [
    ({"resolution": 256, "resamp_with_conv": False}, "no exact UNet2DModel form"),
    ({"resolution": 256, "ch": 100}, "multiple of 32"),
    ({"resolution": 256, "var_type": "learned"}, "var_type"),
    ({"resolution": 256, "channels": 3}, "unknown key"),
    ({"ch": 128}, "'resolution'"),
])
def test_architectures_unet2dmodel_cannot_express_are_refused(keys, words):
    with pytest.raises(ConfigError, match=words):
        ddpm.DDPMArch.from_dict(keys)


def test_from_dict_takes_the_ddim_yaml_keys():
    arch = ddpm.DDPMArch.from_dict({"image_size": 256, "ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4],
                                    "attn_resolutions": [16], "var_type": "fixedlarge"})
    assert arch == ddpm.DDPMArch(resolution=256, var_type="fixedlarge")
    assert ddpm.scheduler_config(arch)["variance_type"] == "fixed_large"
