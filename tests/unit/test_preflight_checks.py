"""Preflight of every file a job reads, and of settings under which a job would do nothing it was asked
for (issue 24), at the check functions: each fails in one line naming its key and file, before any model
or Ray starts; the legitimate ones warn in one line."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from pipeline.config import ClipConfig, validate
from pipeline.data.directions import write_direction
from pipeline.data.model_store import resolve_model, unet_conditioning
from pipeline.errors import ConfigError, StorageError
from pipeline.jobs import direction_fit, edit, guide, search
from pipeline.jobs.checks import check_clip_checkpoint
from pipeline.metrics.lpips_net import check_lpips_file
from pipeline.stages.hspace import mid_block_sizes, preflight_grid
from pipeline.tools.random_clip import save_random_clip, save_random_lpips

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return save_random_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    return save_random_lpips(tmp_path_factory.mktemp("lpips") / "lpips-alex.safetensors")


def truncated(path, dest):
    data = open(path, "rb").read()
    with open(dest, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(dest)


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---- CLIP checkpoints -------------------------------------------------------------------------


def test_a_sound_clip_checkpoint_passes(clip_files):
    config, weights = clip_files
    check_clip_checkpoint(ClipConfig(model=config, pretrained=weights), "CLIP scores need")


def test_a_truncated_clip_checkpoint_is_refused_naming_the_key_and_file(clip_files, tmp_path):
    config, weights = clip_files
    bad = truncated(weights, tmp_path / "clip.safetensors")
    with pytest.raises(ConfigError) as err:
        check_clip_checkpoint(ClipConfig(model=config, pretrained=bad), "CLIP scores need")
    text = one_line(err)
    assert text.startswith("config error: clip.pretrained") and bad in text and "truncated" in text


def test_a_pickle_clip_checkpoint_is_refused_without_allow_pickle(clip_files, tmp_path):
    config, weights = clip_files
    pickled = tmp_path / "clip.bin"
    shutil.copy(weights, pickled)
    with pytest.raises(ConfigError) as err:
        check_clip_checkpoint(ClipConfig(model=config, pretrained=str(pickled)), "CLIP scores need")
    assert "clip.pretrained" in one_line(err) and "pickle" in str(err.value) and str(pickled) in str(err.value)
    # a trusted pickle passes preflight (its shapes are checked when it is unpickled, on the actor)
    check_clip_checkpoint(ClipConfig(model=config, pretrained=str(pickled), allow_pickle=True), "CLIP scores need")


def test_a_clip_architecture_that_does_not_fit_the_weights_is_refused(clip_files):
    _, weights = clip_files
    with pytest.raises(ConfigError) as err:
        check_clip_checkpoint(ClipConfig(model="ViT-B-16-quickgelu", pretrained=weights), "CLIP scores need")
    text = one_line(err)
    assert "clip.model 'ViT-B-16-quickgelu'" in text and weights in text and "another shape" in text


def test_a_missing_clip_checkpoint_is_refused(clip_files, tmp_path):
    config, _ = clip_files
    with pytest.raises(ConfigError, match=r"clip.pretrained .*nope.safetensors.*no such file"):
        check_clip_checkpoint(ClipConfig(model=config, pretrained=str(tmp_path / "nope.safetensors")), "X needs")


# ---- LPIPS files ------------------------------------------------------------------------------


def test_lpips_files_are_checked_against_the_net(lpips_file, tmp_path):
    check_lpips_file(lpips_file, "alex")
    with pytest.raises(ConfigError, match=r"hspace.lpips .* holds an LPIPS-alex network, not LPIPS-vgg"):
        check_lpips_file(lpips_file, "vgg")
    with pytest.raises(ConfigError, match=r"hspace.lpips .*not a readable safetensors file"):
        check_lpips_file(truncated(lpips_file, tmp_path / "t.safetensors"), "alex")
    with pytest.raises(ConfigError, match=r"hspace.lpips .*no such file"):
        check_lpips_file(tmp_path / "no-lpips.safetensors", "alex")


# ---- direction files against the model they edit ---------------------------------------------


def edit_config(tmp_path, model, **hspace):
    return validate({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "source": {"model": str(model)},
        "hspace": {"direction": str(tmp_path / "dir.safetensors"), "t0": 999, "steps": 8, **hspace},
        "image": {"size": 16},
    })


def table_direction(path, channels: int, model: str, t0: int = 999, steps: int = 8, t_edit: int = 500) -> None:
    timesteps = [int(t) for t in np.linspace(t0, 0, steps)]
    write_direction(str(path), {}, {"deltas": np.zeros((steps, channels, 2, 2), np.float32)},
                    {"kind": "table", "model": model, "timesteps": timesteps, "t0": t0, "steps": steps,
                     "grid": "schedule", "t_edit": t_edit, "t_boost": 200})


def test_the_mid_block_sizes_come_from_the_config_on_the_meta_device(pixel_model):
    from pipeline.diffusion.hspace import h_channels, temb_channels
    from pipeline.stages.base import load_model

    folder = resolve_model(str(pixel_model))
    den = load_model(validate({"source": {"model": str(pixel_model)}}).source, "float32", "auto")
    assert mid_block_sizes(folder) == (h_channels(den.unet), temb_channels(den.unet))


def test_a_direction_of_another_h_is_refused_naming_the_key_file_and_model(tmp_path, pixel_model):
    channels, _ = mid_block_sizes(resolve_model(str(pixel_model)))
    table_direction(tmp_path / "dir.safetensors", channels + 4, "s3://b/other-model")
    with pytest.raises(ConfigError) as err:
        edit.check(edit_config(tmp_path, pixel_model))
    text = one_line(err)
    assert text.startswith("config error: hspace.direction") and str(tmp_path / "dir.safetensors") in text
    assert f"holds h of {channels + 4} channels" in text and "s3://b/other-model" in text and str(pixel_model) in text


def test_a_delta_block_of_another_model_is_refused(tmp_path, pixel_model):
    channels, temb = mid_block_sizes(resolve_model(str(pixel_model)))
    write_direction(str(tmp_path / "dir.safetensors"), {},
                    {"conv1.weight": np.zeros(1, np.float32), "temb_proj.weight": np.zeros(1, np.float32),
                     "conv2.weight": np.zeros(1, np.float32)},
                    {"kind": "delta-block", "model": "m", "channels": channels, "temb_channels": temb + 1,
                     "timesteps": [999], "t0": 999, "steps": 8, "t_edit": 500, "t_boost": 200})
    with pytest.raises(ConfigError, match=r"hspace.direction .*DeltaBlock .*train the direction on this model"):
        edit.check(edit_config(tmp_path, pixel_model))


def test_a_direction_of_another_model_or_grid_that_fits_is_warned_about(tmp_path, pixel_model, caplog):
    channels, _ = mid_block_sizes(resolve_model(str(pixel_model)))
    table_direction(tmp_path / "dir.safetensors", channels, "elsewhere/model", steps=10)
    with caplog.at_level(logging.WARNING):
        edit.check(edit_config(tmp_path, pixel_model))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fitted on 'elsewhere/model', not source.model" in m for m in lines), lines
    assert any("grid of 10 steps" in m and "grid of 8 steps" in m and "scaled by 1.25" in m for m in lines), lines
    assert all("\n" not in m for m in lines)
    caplog.clear()
    table_direction(tmp_path / "dir.safetensors", channels, str(pixel_model),
                    t0=preflight_grid(resolve_model(str(pixel_model)), edit_config(tmp_path, pixel_model).hspace)[0])
    with caplog.at_level(logging.WARNING):
        edit.check(edit_config(tmp_path, pixel_model))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_missing_direction_file_is_named_by_its_key(tmp_path, pixel_model):
    with pytest.raises(StorageError, match=r"^hspace.direction .*dir.safetensors"):
        edit.check(edit_config(tmp_path, pixel_model))


# ---- no silent no-op: edit --------------------------------------------------------------------


def test_t_edit_above_the_walk_is_refused(tmp_path, pixel_model):
    channels, _ = mid_block_sizes(resolve_model(str(pixel_model)))
    table_direction(tmp_path / "dir.safetensors", channels, str(pixel_model))
    with pytest.raises(ConfigError) as err:
        edit.check(edit_config(tmp_path, pixel_model, t0=300, t_edit=800))
    text = one_line(err)
    assert text.startswith("config error: hspace.t_edit = 800 is above every timestep") and "hspace.t0" in text
    # the file's own t_edit (null) is held to the same rule, and said to be the file's
    table_direction(tmp_path / "dir.safetensors", channels, str(pixel_model), t_edit=900)
    with pytest.raises(ConfigError, match=r"hspace.t_edit = 900 \(null: the direction file's own\)"):
        edit.check(edit_config(tmp_path, pixel_model, t0=300))
    edit.check(edit_config(tmp_path, pixel_model, t0=999, t_edit=800))  # on the walk: fine


def test_scales_of_only_zero_are_refused(tmp_path, pixel_model):
    with pytest.raises(ConfigError, match=r"^config error: hspace.scales = \[0.0\]: every scale is 0"):
        edit.check(edit_config(tmp_path, pixel_model, scales=[0]))


# ---- direction fit: example sets, LPIPS, CLIP, t_edit -----------------------------------------


def fit_config(tmp_path, model, **hspace):
    return validate({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "source": {"model": str(model)},
        "hspace": {"direction": str(tmp_path / "dir.safetensors"), "examples": str(tmp_path / "red"),
                   "t0": 999, "steps": 8, **hspace},
        "image": {"size": 16},
    })


def with_shards(tmp_path, *names):
    from shard_builders import good_samples, tar_bytes

    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "shard-0.tar").write_bytes(tar_bytes(good_samples(0, 2)))


def test_an_empty_example_set_is_named_by_hspace_examples(tmp_path, pixel_model):
    with_shards(tmp_path, "in")
    (tmp_path / "red").mkdir()
    with pytest.raises(StorageError) as err:
        direction_fit.check(fit_config(tmp_path, pixel_model))
    text = one_line(err)
    assert text.startswith(f"hspace.examples {tmp_path / 'red'}: no .tar shards") and "input.uri" not in text


def test_the_lpips_file_of_a_fit_is_checked_by_its_key(tmp_path, pixel_model, lpips_file):
    with_shards(tmp_path, "in", "red")
    missing = str(tmp_path / "no-lpips.safetensors")
    with pytest.raises(ConfigError) as err:
        direction_fit.check(fit_config(tmp_path, pixel_model, lpips=missing, t_edit="auto"))
    assert one_line(err).startswith("config error: hspace.lpips") and missing in str(err.value)
    with pytest.raises(ConfigError, match=r"hspace.lpips .*not LPIPS-vgg"):
        direction_fit.check(fit_config(tmp_path, pixel_model, lpips=lpips_file, lpips_net="vgg"))
    direction_fit.check(fit_config(tmp_path, pixel_model, lpips=lpips_file, t_edit="auto"))


def test_the_clip_checkpoint_of_a_learned_fit_is_checked(tmp_path, pixel_model, clip_files):
    with_shards(tmp_path, "in")
    config, weights = clip_files
    bad = truncated(weights, tmp_path / "clip.safetensors")
    cfg = fit_config(tmp_path, pixel_model, method="learned", source_text="a", target_text="b",
                     train={"loss": "clip"})
    cfg.clip.model, cfg.clip.pretrained = config, bad
    with pytest.raises(ConfigError, match=r"^config error: clip.pretrained .*clip.safetensors.*truncated"):
        direction_fit.check(cfg)


def test_a_fit_with_t_edit_above_its_walk_is_refused(tmp_path, pixel_model):
    with_shards(tmp_path, "in", "red")
    with pytest.raises(ConfigError, match=r"^config error: hspace.t_edit = 800 is above every timestep"):
        direction_fit.check(fit_config(tmp_path, pixel_model, t0=300, t_edit=800))


# ---- model kinds: search ----------------------------------------------------------------------


def search_config(tmp_path, model, clip_files, **search):
    config, weights = clip_files
    return validate({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "source": {"model": str(model), "condition": "a cat"}, "target": {"condition": "a dog"},
        "sampler": {"method": "dpm", "steps": 4, "eta": 0.1},
        "search": {"trials": 1, "skips": [1], "decoder_scales": [1.0], **search},
        "clip": {"model": config, "pretrained": weights},
    })


def test_model_conditioning_is_read_from_the_config(pixel_model, sd_model, class_model):
    assert unet_conditioning(resolve_model(str(pixel_model))) == "none"
    assert unet_conditioning(resolve_model(str(class_model))) == "class"
    assert unet_conditioning(resolve_model(str(sd_model))) == "text"


def test_search_refuses_a_model_without_text(tmp_path, pixel_model, sd_model, clip_files):
    with pytest.raises(ConfigError) as err:
        search.check(search_config(tmp_path, pixel_model, clip_files))
    text = one_line(err)
    assert text.startswith(f"config error: source.model {str(pixel_model)!r} is unconditional")
    search.check(search_config(tmp_path, sd_model, clip_files))


def test_search_skips_that_leave_no_step_are_refused(tmp_path, sd_model, clip_files):
    with pytest.raises(ConfigError, match=r"^config error: search.skips \[4\] must lie in 0..3"):
        search.check(search_config(tmp_path, sd_model, clip_files, skips=[4]))


# ---- guide: 0 Langevin steps with λ > 0 -------------------------------------------------------


def guide_config(tmp_path, model, **g):
    return validate({"output": {"uri": str(tmp_path / "out")}, "source": {"model": str(model)},
                     "sampler": {"method": "ddim", "eta": 0, "steps": 4},
                     "guide": {"energy": "hue", "count": 2, **g}})


def test_guide_with_no_langevin_step_and_a_weight_warns_in_one_line(tmp_path, pixel_model, caplog):
    with caplog.at_level(logging.WARNING):
        guide.check(guide_config(tmp_path, pixel_model, langevin_steps=0, weight=100))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "guide.langevin_steps is 0" in lines[0] and "guide.weight" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        guide.check(guide_config(tmp_path, pixel_model, langevin_steps=0, weight=0))  # the unguided baseline, λ 0
        guide.check(guide_config(tmp_path, pixel_model, langevin_steps=3))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_condition_the_model_cannot_take_is_refused(tmp_path, pixel_model, class_model):
    cfg = guide_config(tmp_path, pixel_model)
    cfg.source.condition = "a cat"
    with pytest.raises(ConfigError, match=r"^config error: source.condition = 'a cat', but source.model .* is "
                                          r"unconditional; set source.condition: null"):
        guide.check(cfg)
    cfg = guide_config(tmp_path, class_model)
    cfg.source.condition = "a cat"
    with pytest.raises(ConfigError, match=r"is a prompt, but source.model .* is class-conditional"):
        guide.check(cfg)
    cfg.source.condition = 1
    guide.check(cfg)
