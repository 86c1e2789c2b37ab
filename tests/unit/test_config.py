"""Config: typed sections, overrides, and one-line errors that name key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import apply_override, load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "sampler: {eta: 1e-4, steps: 20}\nsource: {model: /m, condition: 3}\n"))
    assert cfg.sampler.eta == pytest.approx(1e-4) and cfg.sampler.steps == 20
    assert cfg.source.condition == 3 and cfg.target.model is None
    assert cfg.runtime.dtype == "auto" and cfg.output.latents == "full" and cfg.ood.t0 == 500


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "{}"), [
        "sampler.steps=30", "sampler.strength=0.5", "ood.geometric=false", "source.condition=null",
        "runtime.actors=[2, 8]", "target.condition=a photo of a dog", "input.storage_options.endpoint_url=http://127.0.0.1:9000",
        "runtime.gpus_per_actor=0.5",
    ])
    assert cfg.sampler.steps == 30 and cfg.sampler.strength == 0.5 and cfg.ood.geometric is False
    assert cfg.source.condition is None and cfg.runtime.actors == [2, 8] and cfg.runtime.gpus_per_actor == 0.5
    assert cfg.target.condition == "a photo of a dog"
    assert cfg.input.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}


@pytest.mark.parametrize(
    "override,expected",
    [
        ("sampler.eta=-0.1", r"^config error: sampler\.eta = -0\.1: .*greater than or equal to 0$"),
        ("sampler.strength=0", r"^config error: sampler\.strength = 0: .*greater than 0$"),
        ("sampler.strength=1.5", r"^config error: sampler\.strength = 1\.5: .*less than or equal to 1$"),
        ("sampler.steps=0", r"^config error: sampler\.steps = 0: .*greater than or equal to 1$"),
        ("sampler.steps=ten", r'^config error: sampler\.steps = "ten": .*valid integer$'),
        ("sampler.eta=0", r"^config error: sampler\.eta = 0: .*needs eta > 0"),
        ("sampler.method=ddpm", r"^config error: sampler\.method = \"ddpm\": .*'dpm' or 'ddim'$"),
        ("sampler.etaa=0.1", r"^config error: sampler\.etaa = 0\.1: unknown key; allowed: method, steps, eta"),
        ("inputs.uri=x", r"^config error: inputs = .*unknown section; allowed: input, output"),
        ("runtime.actors=[4, 2]", r"^config error: runtime\.actors = \[4, 2\]: .*min <= max"),
        ("runtime.batch_size=true", r"^config error: runtime\.batch_size = true: .*valid integer$"),
        ("output.latents=some", r"^config error: output\.latents = \"some\": .*'full', 'start' or 'none'$"),
        ("source.guidance_scale=-1", r"^config error: source\.guidance_scale = -1: "),
        ("sampler.refine_steps=20000", r"^config error: sampler\.refine_steps = 20000: Input should be less than or equal to 10000$"),
        ("source.condition=[1, 2]", r"^config error: source\.condition = \[1, 2\]: .*integer or a valid string$"),
        ("ood.variance=full", r"^config error: ood\.variance = \"full\": .*'isotropic', 'scalar' or 'diagonal'$"),
    ],
)
def test_each_bad_value_is_one_line_naming_key_value_and_rule(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "{}"), [override])
    message = str(err.value)
    assert "\n" not in message
    assert __import__("re").search(expected, message), message


def test_credentials_in_storage_options_are_refused_and_never_echoed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "input: {storage_options: {secret: hunter2, endpoint_url: x}}"))
    assert "hunter2" not in str(err.value)
    assert "credential" in str(err.value) and "environment" in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"line 2: not valid YAML"):
        load_config(write(tmp_path, "sampler: {}\nimage: size: 3\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(write(tmp_path, "{}"), ["sampler"])


def test_override_through_a_value_is_an_error():
    data = {"sampler": {"steps": 3}}
    with pytest.raises(ConfigError, match="sampler.steps is not a section"):
        apply_override(data, "sampler.steps.x=1")


def test_require_names_the_missing_key(tmp_path):
    cfg = load_config(write(tmp_path, "source: {model: /m}"))
    cfg.require("source.model")
    with pytest.raises(ConfigError, match=r"target\.model is not set"):
        cfg.require("source.model", "target.model")


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(write(tmp_path, "sampler: {steps: 10}"))
    b = load_config(write(tmp_path, "sampler: {steps: 10}"))
    c = load_config(write(tmp_path, "sampler: {steps: 11}"))
    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "kustomization.yaml"), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_gpus_per_actor_auto_follows_the_declared_variable_before_the_cluster(monkeypatch):
    """GPU workers that scale from zero show no GPU at job start; the head's variable says they will come."""
    from pipeline.runtime.ray_env import gpus_per_actor

    cfg = load_config(ROOT / "configs" / "afhq-cat2dog.yaml")
    monkeypatch.setenv("LATENTSHIFT_GPUS_PER_ACTOR", "1")
    assert gpus_per_actor(cfg.runtime) == 1.0
    monkeypatch.setenv("LATENTSHIFT_GPUS_PER_ACTOR", "0.5")
    assert gpus_per_actor(cfg.runtime) == 0.5
    monkeypatch.setenv("LATENTSHIFT_GPUS_PER_ACTOR", "one")
    with pytest.raises(ConfigError, match="LATENTSHIFT_GPUS_PER_ACTOR = 'one'"):
        gpus_per_actor(cfg.runtime)
    explicit = load_config(ROOT / "configs" / "afhq-cat2dog.yaml", ["runtime.gpus_per_actor=0"])
    assert gpus_per_actor(explicit.runtime) == 0.0  # an explicit number wins over the variable


def _ldm_make_ddim_timesteps(num_ddim_timesteps: int, num_ddpm_timesteps: int = 1000) -> list[int]:
    """cycle-diffusion model/lib/stable_diffusion/ldm/modules/diffusionmodules/util.py:46-57, 'uniform',
    written out: c = T // S; range(0, T, c) cut to S entries; + 1."""
    c = num_ddpm_timesteps // num_ddim_timesteps
    return [t + 1 for t in list(range(0, num_ddpm_timesteps, c))[:num_ddim_timesteps]]


def _official_walk(custom_steps: int, skip_steps: int) -> list[int]:
    """ldm/models/diffusion/ddim.py:468-473 (_ddpm_ddim_encoding): time_range = flip(ddim_timesteps),
    refine_steps = total_steps − skip_steps, the walk is time_range[-refine_steps:]."""
    time_range = _ldm_make_ddim_timesteps(custom_steps)[::-1]
    refine_steps = len(time_range) - skip_steps
    return time_range[-refine_steps:]


def test_paper_configs_walk_the_official_grids():
    """configs/paper/ as the official runs: AFHQ starts at t = 849 and walks every timestep below
    (custom_steps 1000, es_steps 850); SD's custom_steps 99 is LDM's grid 981, 971, …, 1 (not 991: that
    is 100 steps), and a skip's walk is the official one (skip 25 starts at 731)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from pipeline.diffusion.schedule import schedule_from_scheduler

    for name in ("afhq-cat2dog", "afhq-wild2dog"):
        s = load_config(ROOT / "configs" / "paper" / f"{name}.yaml").sampler
        grid = schedule_from_scheduler(DDPMScheduler()).grid(s.steps, s.strength)
        assert grid == list(range(849, -1, -1)) and s.eta == 0.1 and s.clip_x0 == "off"
    assert load_config(ROOT / "configs" / "paper" / "afhq-cat2dog.yaml").sampler.refine_steps == 100
    assert load_config(ROOT / "configs" / "paper" / "afhq-wild2dog.yaml").sampler.refine_steps == 150
    s = load_config(ROOT / "configs" / "paper" / "sd-zero-shot.yaml").sampler
    sd = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               steps_offset=1, set_alpha_to_one=False))
    # translate_text2img256_stable_diffusion_stochastic_1.cfg:7 custom_steps = 99
    assert s.steps == 99 and sd.grid(s.steps) == _ldm_make_ddim_timesteps(99)[::-1]
    assert sd.grid(s.steps)[:2] == [981, 971] and len(sd.grid(s.steps)) == 99
    assert sd.grid(s.steps, s.strength) == _official_walk(99, 25)  # skip 25 (line 13): 731, 721, …, 1
    assert sd.grid(s.steps, s.strength)[0] == 731
    search = load_config(ROOT / "configs" / "paper" / "sd-zero-shot-search.yaml")
    assert search.sampler.steps == 99 and search.search.skips == [15, 20, 25, 30, 40, 50]
    full = sd.grid(search.sampler.steps)
    for skip in search.search.skips:  # each skip's walk and start: 831, 781, 731, 681, 581, 481
        assert full[skip:] == _official_walk(99, skip) and full[skip] == 981 - 10 * skip
    # the official CLIP preprocessing: no antialiasing (torchvision < 0.17 on tensors), unclamped candidates
    assert search.clip.antialias is False and search.search.clamp is False
