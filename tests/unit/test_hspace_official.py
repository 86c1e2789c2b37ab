"""h-space editing as the official Asyrp code runs it (kwonminki/Asyrp_official): t_boost from the
released LPIPS curves, unclamped curves, float32 training, η = 1 inside the edit range, the linspace
grid and the official inversion. Each expectation is written from the official code, cited by file:line."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import HSpaceConfig, ModelConfig, OutputConfig
from pipeline.diffusion import ddim_invert_model_space, load_denoiser
from pipeline.diffusion.hspace import (
    EditSchedule,
    MidBlockHook,
    TableDirection,
    edit_walk,
    first_timestep_reaching,
    grid_schedule,
    hspace_grid,
)
from pipeline.diffusion.noise import NoiseSource
from pipeline.errors import ConfigError
from pipeline.stages.hspace import auto_time

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "asyrp_celeba_lpips.tsv"


@pytest.fixture(scope="module")
def den(models_dir):
    from tiny_models import _scheduler, save_pixel_model

    # final ᾱ = ᾱ_0 (set_alpha_to_one off), so a walk ending at ᾱ = 1 shows the linspace grid's own end
    sched = _scheduler("ddim", clip_sample=False, set_alpha_to_one=False)
    return load_denoiser(str(save_pixel_model(models_dir / "hspace-official", seed=7, scheduler=sched)))


def official_alphas() -> np.ndarray:
    """alphas_cumprod as the official code builds it: get_beta_schedule linear (utils/diffusion_utils.py:5-9),
    then (1.0 - b).cumprod (:67), β from 1e-4 to 0.02 over 1000 steps as the tiny models."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def official_seq(t0: int, n: int) -> list[int]:
    """diffusion_latent.py:570-573 (and :154-156, :955-956), verbatim."""
    seq = np.linspace(0, 1, n) * t0
    return [int(s + 1e-6) for s in list(seq)]


# ---- t_edit / t_boost from LPIPS curves ------------------------------------------------------


def released_curves() -> dict:
    rows = [r for r in csv.reader(DATA.read_text().splitlines(), delimiter="\t") if r and not r[0].startswith("#")]
    body = rows[1:]  # header: t, x_t, x0_t
    return {"timesteps": [int(r[0]) for r in body], "x_t": [float(r[1]) for r in body],
            "x0_hat": [float(r[2]) for r in body], "text_cosine": None}


def test_t_boost_from_the_released_celeba_curves_with_both_official_thresholds():
    """set_t_edit_t_addnoise (diffusion_latent.py:1373-1376, :1386-1405): the first key, scanning the sorted
    keys up, whose value ≥ the threshold; with --add_noise_from_xt the x_t file (:1386-1399), else the x0_t file."""
    curves = released_curves()
    # script_inference.sh:34-35: --add_noise_from_xt --lpips_addnoise_th 1.2: our default
    assert HSpaceConfig().boost_curve == "x_t" and HSpaceConfig().boost_threshold == 1.2
    assert auto_time(HSpaceConfig(), curves, "t_boost") == 167
    # the old reading, 0.1 (main.py:22's default) on the x_t curve: a t_boost 16 times lower
    assert auto_time(HSpaceConfig(lpips_boost_threshold=0.1), curves, "t_boost") == 10
    # main.py without --add_noise_from_xt: main.py:22's 0.1 on the x0_t curve, the default for x0_hat
    x0_hat = HSpaceConfig(boost_curve="x0_hat")
    assert x0_hat.boost_threshold == 0.1 and auto_time(x0_hat, curves, "t_boost") == 193
    # t_edit: LPIPS(x0, x0_t) ≥ 0.33 · cos(texts) (script_inference.sh:36, diffusion_latent.py:1334)
    assert auto_time(HSpaceConfig(), curves, "t_edit") == 538
    assert auto_time(HSpaceConfig(), {**curves, "text_cosine": 0.8}, "t_edit") == 489  # 0.264


def test_a_threshold_never_reached_is_an_error_naming_the_setting_and_the_curve_maximum():
    """The official code fails there (t_addnoise unbound, diffusion_latent.py:1402-1406); ours says what to change."""
    curves = released_curves()  # x0_t rows 1…560: at most 0.37
    assert first_timestep_reaching(curves["timesteps"], curves["x0_hat"], 1.2) is None
    top = max(curves["x0_hat"])
    at = curves["timesteps"][curves["x0_hat"].index(top)]
    with pytest.raises(ConfigError, match=r"hspace\.t_boost = auto") as err:
        auto_time(HSpaceConfig(boost_curve="x0_hat", lpips_boost_threshold=1.2), curves, "t_boost")
    message = str(err.value)
    assert "hspace.lpips_boost_threshold 1.2" in message and f"{top:.3f} at t = {at}" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"hspace\.t_edit = auto.*lpips_edit_threshold 0\.9 × cos\(texts\) 0\.500"):
        auto_time(HSpaceConfig(lpips_edit_threshold=0.9), {**curves, "text_cosine": 0.5}, "t_edit")


def test_the_fit_measures_lpips_on_the_unclamped_x_t_and_x0_hat(pixel_model, tmp_path):
    """loss_fn_alex(x, x0) and loss_fn_alex(x0_t, x0) on the raw tensors (diffusion_latent.py:1260-1261)."""
    from pipeline.data.rows import PIXEL_COLUMNS, RowBuffer, RowKind, rows_of
    from pipeline.data.stats import tensors_from_bytes
    from pipeline.diffusion.hspace import trace_h
    from pipeline.metrics.lpips_net import load_lpips, lpips_distance
    from pipeline.stages.hspace import DirectionFitStage
    from pipeline.tools.random_clip import save_random_lpips

    lpips_file = save_random_lpips(str(tmp_path / "lpips.safetensors"))
    hspace = HSpaceConfig(direction=str(tmp_path / "d.safetensors"), t0=999, steps=4, lpips=lpips_file,
                          t_edit=500, t_boost=200)
    stage = DirectionFitStage(ModelConfig(model=str(pixel_model)), hspace, OutputConfig(latents="none"), dtype="float32")
    rng = np.random.default_rng(0)
    rows = RowBuffer(PIXEL_COLUMNS)
    for i in range(3):
        rows.add(shard="s", key=f"k{i}", index=i, kind=RowKind.SAMPLE,
                 pixels=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    batch = rows.batch()
    out = stage(batch)
    (p,) = rows_of(out, RowKind.PARTIAL)
    tensors, meta = tensors_from_bytes(out["partial"][p])

    den, net = stage.source, load_lpips(lpips_file, "alex")
    images = torch.from_numpy(np.stack(batch["pixels"][:3])).permute(0, 3, 1, 2).float() / 127.5 - 1
    trace = trace_h(den, ddim_invert_model_space(den, images, timesteps=meta["timesteps"]).x_start,
                    meta["timesteps"], keep_states=True)
    raw = torch.stack([lpips_distance(net, images, x) for x in trace.x_t], 1).sum(0)
    clamped = torch.stack([lpips_distance(net, images, x.clamp(-1, 1)) for x in trace.x_t], 1).sum(0)
    raw_x0 = torch.stack([lpips_distance(net, images, x) for x in trace.x0_hat], 1).sum(0)
    np.testing.assert_allclose(tensors["lpips_xt_sum"], raw.detach().double().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tensors["lpips_x0_sum"], raw_x0.detach().double().numpy(), rtol=1e-4, atol=1e-5)
    assert (raw - clamped).abs().max() > 1e-3  # x_T lies far outside [-1, 1]: the clamp would change the curve


# ---- float32 training -----------------------------------------------------------------------


def test_the_delta_block_trains_in_float32_under_a_float16_runtime(pixel_model, monkeypatch):
    """runtime.dtype float16 reaches train_direction; the official run_training is float32 throughout
    (diffusion_latent.py:229-355: no half, no autocast), and so is ours: model, block and gradients."""
    import pipeline.diffusion.hspace_train as hspace_train
    from pipeline.config import ClipConfig
    from pipeline.stages.hspace import train_direction

    seen = {}
    original = hspace_train.train_delta_block

    def spy(den, block, *args, **kwargs):
        log = original(den, block, *args, **kwargs)
        seen.update(unet=next(den.unet.parameters()).dtype, params={p.dtype for p in block.parameters()},
                    grads=[p.grad for p in block.parameters()])
        return log

    monkeypatch.setattr(hspace_train, "train_delta_block", spy)
    den = load_denoiser(str(pixel_model))
    grid = den.schedule.grid_from(999, 4)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_start = ddim_invert_model_space(den, x0, timesteps=grid).x_start
    hspace = HSpaceConfig(method="learned", t0=999, steps=4,
                          train={"loss": "color", "images": 2, "iterations": 1, "batch_size": 2, "lr": 0.05})
    state, log, _ = train_direction(ModelConfig(model=str(pixel_model)), hspace, ClipConfig(), "auto", "float16",
                                    x_start.numpy(), x0.numpy(), grid, grid[1])
    assert seen["unet"] == torch.float32 and seen["params"] == {torch.float32}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in seen["grads"])
    assert any(g.abs().max() > 0 for g in seen["grads"])
    assert all(v.dtype == np.float32 for v in state.values()) and all(math.isfinite(v) for v in log.loss)


def test_training_refuses_a_half_precision_model(pixel_model):
    from pipeline.diffusion.hspace import DeltaBlock
    from pipeline.diffusion.hspace_train import train_delta_block

    den = load_denoiser(str(pixel_model), dtype="float16")
    grid = den.schedule.grid_from(999, 4)
    with pytest.raises(ValueError, match="float32 model"):
        train_delta_block(den, DeltaBlock.for_unet(den.unet), torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16),
                          grid, grid[1], lambda a, b: a.mean())


# ---- η = 1 inside the edit range --------------------------------------------------------------


def test_eta_one_below_t_boost_inside_the_edit_range_is_the_official_denoising_step(den):
    """save_image's loop (diffusion_latent.py:503-520): eta=1.0 if t < t_addnoise, Δh if t ≥ t_edit, and
    denoising_step's ddim branch (utils/diffusion_utils.py:84-97) written out step by step."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    seeds, scale = [21, 22], 1.5
    seq = official_seq(999, 8)  # 0, 142, …, 999
    grid = list(reversed(seq))
    t_boost, t_edit = grid[1], grid[5]  # t_boost > t_edit: steps grid[2] … grid[5] are edited and boosted
    with MidBlockHook(den.unet) as hook:
        hook.record = True
        den.eps(x[:1], 500)
    shape = hook.recorded[0].shape[1:]
    deltas = torch.randn(len(grid), *shape, generator=torch.Generator().manual_seed(4))
    direction = TableDirection(list(grid), deltas)

    ac = official_alphas()
    noise = NoiseSource(seeds, "cpu", "boost")

    def by_hand(eta_in_edit_range: bool) -> torch.Tensor:
        xt = x.clone()
        for i, (t, t_next) in enumerate(zip(reversed(seq), reversed([-1] + seq[:-1]), strict=True)):
            at = float(ac[t])
            at_next = 1.0 if t_next == -1 else float(ac[t_next])  # utils/diffusion_utils.py:68-71
            ts = torch.full((2,), t)
            et = den.unet(xt, ts).sample
            et_modified = et
            if t >= t_edit:  # models/ddpm/diffusion.py:510-516: h + Δh·hs_coeff, the skips untouched
                handle = den.unet.mid_block.register_forward_hook(lambda m, a, h, k=i: h + scale * deltas[k])
                try:
                    et_modified = den.unet(xt, ts).sample
                finally:
                    handle.remove()
            eta = 1.0 if t < t_boost and (eta_in_edit_range or t < t_edit) else 0.0
            x0_t = (xt - et_modified * math.sqrt(1 - at)) / math.sqrt(at)  # :86
            if eta == 0:
                xt = math.sqrt(at_next) * x0_t + math.sqrt(1 - at_next) * et  # :92
            else:
                c1 = eta * math.sqrt((1 - at / at_next) * (1 - at_next) / (1 - at))  # :95
                c2 = math.sqrt((1 - at_next) - c1**2)  # :96
                xt = math.sqrt(at_next) * x0_t + c2 * et + c1 * noise.draw(i, (3, 16, 16))  # :97
        return xt

    with torch.no_grad():
        official, eta_zero_in_edit = by_hand(True), by_hand(False)
    plain = den.schedule
    den.schedule = grid_schedule(plain, "linspace")
    try:
        out = edit_walk(den, x, grid, direction, [scale], EditSchedule(t_edit=t_edit, t_boost=t_boost), seeds=seeds)
    finally:
        den.schedule = plain
    torch.testing.assert_close(out, official, atol=2e-4, rtol=2e-4)
    assert (official - eta_zero_in_edit).abs().max() > 1e-2  # the boost inside the edit range changes the output


# ---- the linspace grid and the official inversion ----------------------------------------------


def test_the_linspace_grid_is_the_official_sequence_ending_at_alpha_one(den):
    """seq = [int(s+1e-6) for s in linspace(0, 1, n)·t_0], walked reversed with t_next = [-1] + seq[:-1]
    and ᾱ(−1) = 1 (diffusion_latent.py:570-574, utils/diffusion_utils.py:68-69)."""
    for t0, n in ((999, 50), (999, 40), (600, 7)):
        seq = official_seq(t0, n)
        grid = hspace_grid(den.schedule, t0, n, "linspace")
        assert grid == list(reversed(seq)) and grid[0] == t0 and grid[-1] == 0 and len(grid) == n
    assert hspace_grid(den.schedule, 999, 50, "linspace")[:4] == [999, 978, 958, 937]  # 999·k/49 floored
    # the released utils/celeba_LPIPS_distance_*.tsv hold t = 1 … 999 without 998 (tests/data/asyrp_celeba_lpips.tsv):
    # the float expression on 999 steps; 1000 steps hold every t, and 1001 repeat one (dropped: a t → t step is the identity)
    assert 998 not in hspace_grid(den.schedule, 999, 999, "linspace") and len(hspace_grid(den.schedule, 999, 999, "linspace")) == 999
    assert hspace_grid(den.schedule, 999, 1000, "linspace") == list(range(999, -1, -1))
    assert len(official_seq(999, 1001)) == 1001 and hspace_grid(den.schedule, 999, 1001, "linspace") == list(range(999, -1, -1))
    steps = grid_schedule(den.schedule, "linspace").steps_along(hspace_grid(den.schedule, 999, 50, "linspace"))
    assert steps[-1].t == 0 and steps[-1].alpha_prev == 1.0 and den.schedule.final_alpha_cumprod < 1.0
    assert steps[0].alpha_prev == pytest.approx(float(official_alphas()[978]), rel=1e-5)
    # the default is the scheduler's own grid, t0 snapped: 999 → 975 for 40 steps
    assert hspace_grid(den.schedule, 999, 40) == den.schedule.grid_from(999, 40) and den.schedule.grid_from(999, 40)[0] == 975
    with pytest.raises(ValueError, match="at least 2 steps"):
        hspace_grid(den.schedule, 999, 1, "linspace")


def test_the_official_inversion_loop_step_by_step(den):
    """precompute_pairs (diffusion_latent.py:1029-1044): x = x0, then for (i, j) in zip(seq_inv_next[1:],
    seq_inv[1:]) one ddim denoising_step from t = i to t_next = j with η = 0: et = ε_θ(x, i) at the lower i,
    x0_t = (x − et·√(1−a_i))/√a_i, x = √a_j·x0_t + √(1−a_j)·et (utils/diffusion_utils.py:46, 86-92)."""
    n, t0 = 10, 999
    seq = official_seq(t0, n)
    seq_next = [-1] + seq[:-1]
    ac = official_alphas()
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        x = x0.clone()
        for i, j in zip(seq_next[1:], seq[1:], strict=True):
            et = den.unet(x, torch.full((2,), i)).sample
            x0_t = (x - et * math.sqrt(1 - ac[i])) / math.sqrt(ac[i])
            x = math.sqrt(ac[j]) * x0_t + math.sqrt(1 - ac[j]) * et

    grid = hspace_grid(den.schedule, t0, n, "linspace")
    calls = []
    handle = den.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        z = ddim_invert_model_space(den, x0, timesteps=grid, eps_at="lower")
    finally:
        handle.remove()
    assert len(calls) == n - 1  # from x0 at t = 0: no step from ᾱ = 1, one per grid pair
    assert z.timesteps == grid
    torch.testing.assert_close(z.x_start, x.float(), atol=2e-4, rtol=2e-4)
    upper = ddim_invert_model_space(den, x0, timesteps=grid)  # the default convention is another latent
    assert (upper.x_start - z.x_start).abs().max() > 1e-3
