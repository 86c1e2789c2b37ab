"""Model stages in three phases (prepare → compute under the device lock → emit), without Ray:
two batches at once never share the device section and give what one at a time gives; the
vectorised emit writes the rows the maths says; a compiled UNet sees one batch shape; the
per-batch profile; the bench's figures from a profile; and ``RowBuffer.extend``."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from small_gpu import out_of_memory_above

from pipeline.config import ModelConfig, OutputConfig, SamplerConfig
from pipeline.data.profile import ENV, read_profile
from pipeline.data.rows import COLUMNS, OUTPUT_COLUMNS, PIXEL_COLUMNS, RowBuffer, RowKind, rows_of
from pipeline.diffusion import dpm_decode, dpm_encode, load_denoiser, sample_seed
from pipeline.stages.codec import DecodeStage, EncodeStage, TranslateStage
from pipeline.tools.bench import profile_figures

pytestmark = pytest.mark.unit

SAMPLER = SamplerConfig(steps=4, strength=0.5)  # η 0.1 (dpm): 2 timesteps, 3 latent maps per sample


def translate_stage(source, target, output: OutputConfig | None = None) -> TranslateStage:
    return TranslateStage(ModelConfig(model=str(source)), ModelConfig(model=str(target)), SAMPLER,
                          output or OutputConfig(latents="full"), dtype="float32")


def pixel_batch(seed: int, n: int, reject_at: int | None = None, shard: str = "shard-000") -> dict:
    """n SAMPLE rows of 16×16 RGB pixels (the tiny models' sample size), and a REJECT row at ``reject_at``."""
    rng = np.random.default_rng(seed)
    rows = RowBuffer(PIXEL_COLUMNS)
    for i in range(n + (reject_at is not None)):
        if i == reject_at:
            rows.add(shard=shard, key=f"bad{seed}", index=100 + i, kind=RowKind.REJECT, error="undecodable image")
            continue
        rows.add(shard=shard, key=f"k{seed}-{i}", index=100 + i, kind=RowKind.SAMPLE,
                 pixels=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                 member_names=("json",), member_data=(f'{{"i": {i}}}'.encode(),))
    return rows.batch()


def assert_batches_equal(a: dict, b: dict) -> None:
    """Every column, its dtype and every cell (ndarrays by value and dtype, floats NaN-aware)."""
    assert a.keys() == b.keys()
    for c in a:
        assert a[c].dtype == b[c].dtype and len(a[c]) == len(b[c]), c
        if a[c].dtype != object:
            assert np.array_equal(a[c], b[c], equal_nan=a[c].dtype.kind == "f"), c
            continue
        for x, y in zip(a[c], b[c], strict=True):
            if isinstance(x, np.ndarray):
                assert isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y), c
            else:
                assert x == y, c


def kind_rows(batch: dict, kind: RowKind) -> dict:
    idx = rows_of(batch, kind)
    return {c: v[idx] for c, v in batch.items()}


# ---- two batches at once ----------------------------------------------------------------------


def test_two_threads_never_share_the_device_section_and_match_sequential_calls(pixel_model, other_pixel_model):
    """Both batches finish ``prepare`` before either computes (a barrier), so without the device lock
    their compute sections would overlap; with it they run one after the other, and each thread gets
    exactly what a call on its own gives."""
    assert TranslateStage.concurrent_batches == EncodeStage.concurrent_batches == DecodeStage.concurrent_batches == 2
    stage = translate_stage(pixel_model, other_pixel_model)
    batches = [pixel_batch(1, 3, reject_at=1), pixel_batch(2, 4)]
    sequential = [stage(b) for b in batches]

    prepare, compute = stage.prepare, stage.compute
    barrier, guard = threading.Barrier(2), threading.Lock()
    active, peak, spans = [0], [0], []

    def prepare_then_meet(batch):
        work = prepare(batch)
        barrier.wait(timeout=60)  # both batches are prepared and race for the device
        return work

    def recorded_compute(work):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        start = time.perf_counter()
        time.sleep(0.2)  # widen the section: the other thread is already waiting to enter it
        try:
            return compute(work)
        finally:
            with guard:
                active[0] -= 1
                spans.append((start, time.perf_counter()))

    stage.prepare, stage.compute = prepare_then_meet, recorded_compute
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(stage, batches))

    assert len(spans) == 2 and peak[0] == 1
    (_, first_end), (second_start, _) = sorted(spans)
    assert first_end <= second_start
    for got, want in zip(concurrent, sequential, strict=True):
        assert_batches_equal(got, want)
        assert len(rows_of(got, RowKind.SAMPLE)) > 0 and len(rows_of(got, RowKind.LATENT)) > 0


# ---- the rows a batch leaves as ---------------------------------------------------------------


def test_emitted_rows_are_the_direct_computation_row_by_row(pixel_model, other_pixel_model):
    """LATENT rows: samples × (1 + K), steps 0..K per sample in order, each map the float16 of
    dpm_encode's x_start / noise on the same pixels and seeds; SAMPLE rows: dpm_decode's images,
    PSNR and SSIM as skimage measures them, the carried members and provenance columns."""
    stage = translate_stage(pixel_model, other_pixel_model)
    batch = pixel_batch(3, 3, reject_at=2, shard="shard-007")
    out = stage(batch)

    idx = rows_of(batch, RowKind.SAMPLE)
    keys = [str(batch["key"][i]) for i in idx]
    seeds = [sample_seed(SAMPLER.seed, f"shard-007/{k}") for k in keys]
    pixels = np.stack(batch["pixels"][idx])
    x0 = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    src = load_denoiser(str(pixel_model), dtype="float32")
    tgt = load_denoiser(str(other_pixel_model), dtype="float32")
    z = dpm_encode(src, x0, steps=4, eta=0.1, strength=0.5, seeds=seeds)
    k = len(z.timesteps)
    assert k == 2  # ⌊4 × 0.5⌋
    maps = torch.cat([z.x_start[:, None], z.noise], 1).numpy().astype(np.float16)  # (3, 1 + K, 3, 16, 16)
    images = ((dpm_decode(tgt, z).clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)

    lat = kind_rows(out, RowKind.LATENT)
    assert len(lat["kind"]) == len(idx) * (1 + k)
    assert [(str(key), int(s)) for key, s in zip(lat["key"], lat["step"], strict=True)] == [
        (key, s) for key in keys for s in range(1 + k)]
    for r in range(len(lat["kind"])):
        sample, step = divmod(r, 1 + k)
        assert lat["latent"][r].dtype == np.float16 and lat["latent"][r].shape == (3, 16, 16)
        assert np.array_equal(lat["latent"][r], maps[sample, step])
        assert lat["seed"][r] == seeds[sample] and lat["shard"][r] == "shard-007"
        assert lat["index"][r] == batch["index"][idx[sample]]
        assert list(lat["timesteps"][r]) == z.timesteps

    smp = kind_rows(out, RowKind.SAMPLE)
    assert [str(key) for key in smp["key"]] == keys and list(smp["index"]) == list(batch["index"][idx])
    assert list(smp["seed"]) == seeds and list(smp["latent_rows"]) == [1 + k] * len(idx)
    assert all(list(t) == z.timesteps for t in smp["timesteps"])
    for i in range(len(idx)):
        assert list(smp["member_names"][i]) == ["json"] and list(smp["member_data"][i]) == [f'{{"i": {idx[i]}}}'.encode()]
        assert smp["pixels"][i].dtype == np.uint8 and np.array_equal(smp["pixels"][i], images[i])
        a, b = pixels[i].astype(np.float64), smp["pixels"][i].astype(np.float64)
        assert smp["psnr"][i] == pytest.approx(10 * np.log10(255**2 / np.mean((a - b) ** 2)), rel=1e-6)
        ref = structural_similarity(a, b, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert smp["ssim"][i] == pytest.approx(ref, abs=1e-6)

    rej = kind_rows(out, RowKind.REJECT)
    assert list(rej["key"]) == ["bad3"] and list(rej["error"]) == ["undecodable image"]
    assert len(out["kind"]) == len(idx) * (2 + k) + 1


# ---- a compiled UNet keeps one batch shape --------------------------------------------------


def test_compiled_unet_sees_one_batch_size_and_the_short_batch_is_unchanged(pixel_model, other_pixel_model):
    """Flagged as compiled (not compiled: the shapes are what matters), a short batch is padded to
    the first batch's size; its own samples come out as an unpadded stage makes them."""
    output = OutputConfig(latents="full", latent_dtype="float32")
    stage = translate_stage(pixel_model, other_pixel_model, output)
    stage.source.compiled = stage.target.compiled = True
    sizes = []
    for unet in (stage.source.unet, stage.target.unet):
        unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))

    stage(pixel_batch(4, 4))
    short = pixel_batch(5, 3, reject_at=1)
    padded = stage(short)
    assert sizes and set(sizes) == {4}  # the 3-sample batch ran as 4 rows, in both models

    plain = translate_stage(pixel_model, other_pixel_model, output)
    assert not getattr(plain.source, "compiled", False)
    reference = plain(short)
    assert list(padded["kind"]) == list(reference["kind"])
    for c in ("shard", "key", "index", "step", "seed", "latent_rows", "error"):
        assert list(padded[c]) == list(reference[c]), c
    for kind in (RowKind.SAMPLE, RowKind.LATENT):
        assert len(rows_of(padded, kind)) == {RowKind.SAMPLE: 3, RowKind.LATENT: 9}[kind]
    for i in rows_of(padded, RowKind.LATENT):  # float32 rounding, to 1e-5 of the map's scale: the ε of a
        # 250 → 0 step with η 0.1 is (x_p − μ_θ) / σ with σ ≈ 1e-3, so ~1e3 for a random-weight model
        want = reference["latent"][i]
        assert np.abs(padded["latent"][i] - want).max() <= 1e-5 * np.abs(want).max()
    for i in rows_of(padded, RowKind.SAMPLE):
        assert np.abs(padded["pixels"][i].astype(int) - reference["pixels"][i].astype(int)).max() <= 1
        assert padded["ssim"][i] == pytest.approx(reference["ssim"][i], abs=1e-3)
    (r,) = rows_of(padded, RowKind.REJECT)
    assert padded["key"][r] == "bad5" and padded["error"][r] == "undecodable image" and padded["index"][r] == 101


# ---- batches larger than the device holds ---------------------------------------------------


def test_a_batch_too_large_for_the_device_runs_in_halves_with_the_same_outputs(pixel_model, other_pixel_model):
    """Two models, 7 samples, a device that holds 3 rows: 7 → 4 → 2 rows per call, no row lost or
    repeated, the actor keeps 2 for its next batch; outputs are those of the whole batch at once.
    Decoding stored latents splits the same way."""
    output = OutputConfig(latents="full", latent_dtype="float32")
    plain, small = translate_stage(pixel_model, other_pixel_model, output), translate_stage(
        pixel_model, other_pixel_model, output)
    seen = out_of_memory_above(small.source, 3)
    seen_target = out_of_memory_above(small.target, 3)
    batch = pixel_batch(6, 7, reject_at=3)
    got, want = small(batch), plain(batch)
    assert small.device_rows == 2 and plain.device_rows == 0
    assert max(seen) == 7 and sorted(set(seen)) == [1, 2, 4, 7] and max(seen_target) == 2
    assert list(got["kind"]) == list(want["kind"])
    for c in ("shard", "key", "index", "step", "seed", "latent_rows", "error"):
        assert list(got[c]) == list(want[c]), c
    for i in rows_of(got, RowKind.LATENT):
        assert np.abs(got["latent"][i] - want["latent"][i]).max() <= 1e-5 * np.abs(want["latent"][i]).max()
    for i in rows_of(got, RowKind.SAMPLE):
        assert np.abs(got["pixels"][i].astype(int) - want["pixels"][i].astype(int)).max() <= 1
    seen.clear()
    small(pixel_batch(7, 5))
    assert seen and max(seen) == 2  # the next batch starts at the size that fitted

    decode = DecodeStage(ModelConfig(model=str(other_pixel_model)), dtype="float32")
    calls = out_of_memory_above(decode.target, 2)
    lat = rows_of(want, RowKind.LATENT)
    rows = RowBuffer()
    for i in lat[::3]:  # every sample's start map, with its noise maps: decode the stored latents
        j = np.arange(i, i + 3)
        rows.add(shard="s", key=str(want["key"][i]), index=int(want["index"][i]), kind=RowKind.SAMPLE,
                 latent=np.stack([want["latent"][k] for k in j]), seed=int(want["seed"][i]),
                 timesteps=want["timesteps"][i], method="dpm", eta=0.1, source_model="", source_cond="")
    decoded = decode(rows.batch())
    assert decode.device_rows == 2 and max(calls) == 7
    for a, b in zip(decoded["pixels"], kind_rows(want, RowKind.SAMPLE)["pixels"], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_single_row_that_does_not_fit_fails_naming_the_fixes(pixel_model, other_pixel_model):
    from pipeline.errors import DeviceMemoryError

    stage = translate_stage(pixel_model, other_pixel_model)
    out_of_memory_above(stage.target, 0)
    with pytest.raises(DeviceMemoryError, match=r"one sample of TranslateStage does not fit in GPU memory even "
                       r"alone: lower image.size, .*runtime.dtype.*\(CUDA out of memory \(a test's limit of 0 rows\)\)"):
        stage(pixel_batch(8, 3))
    assert stage.device_rows == 1


# ---- the per-batch profile --------------------------------------------------------------------


def test_profile_lines_of_a_stage(pixel_model, tmp_path, monkeypatch):
    """A load line at construction, then one batch line per call: rows, SAMPLE rows, device and host time."""
    monkeypatch.setenv(ENV, str(tmp_path))
    stage = translate_stage(pixel_model, pixel_model)
    stage(pixel_batch(6, 3, reject_at=0))

    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}.jsonl"]
    load, batch = read_profile(tmp_path)
    assert load["event"] == "load" and batch["event"] == "batch"
    assert load["stage"] == batch["stage"] == "TranslateStage" and load["pid"] == batch["pid"] == os.getpid()
    assert load["start"] <= load["end"] <= batch["start"] <= batch["end"]
    assert batch["rows"] == 4 and batch["samples"] == 3
    assert batch["device_s"] > 0 and batch["host_s"] >= 0 and batch["wait_s"] >= 0


@pytest.mark.parametrize("value", [None, "  "])
def test_no_profile_without_a_folder(pixel_model, tmp_path, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    monkeypatch.chdir(tmp_path)
    stage = translate_stage(pixel_model, pixel_model)
    stage(pixel_batch(7, 2))
    assert not stage.profile.enabled and list(tmp_path.iterdir()) == []


# ---- the bench's figures ------------------------------------------------------------------------


def test_profile_figures_by_hand():
    """Batches ordered by end; a batch of rejects only (0 samples) does not count; the steady window
    runs from the first batch's end to the last's and counts the samples of batches 2..n."""
    lines = [
        {"event": "batch", "stage": "T", "start": 104.5, "end": 106.0, "rows": 2, "samples": 2, "device_s": 0.6,
         "host_s": 0.15, "wait_s": 0.3},
        {"event": "load", "stage": "T", "start": 100.5, "end": 102.5},
        {"event": "batch", "stage": "T", "start": 102.5, "end": 104.0, "rows": 4, "samples": 4, "device_s": 1.0,
         "host_s": 0.25, "wait_s": 0.0},
        {"event": "batch", "stage": "T", "start": 103.0, "end": 105.0, "rows": 5, "samples": 4, "device_s": 0.8,
         "host_s": 0.2, "wait_s": 0.5},
        {"event": "batch", "stage": "T", "start": 103.1, "end": 103.2, "rows": 3, "samples": 0, "device_s": 0.0,
         "host_s": 9.0, "wait_s": 9.0},
    ]
    fig = profile_figures(lines, run_start=100.0)
    assert fig["batches"] == 3
    assert fig["model_load_s"] == pytest.approx(2.0) and fig["models_loaded_after_s"] == pytest.approx(2.5)
    assert fig["time_to_first_batch_s"] == pytest.approx(4.0)  # 104.0 − 100.0
    assert fig["device_s_per_batch"] == pytest.approx(0.8)  # (1.0 + 0.8 + 0.6) / 3
    assert fig["host_s_per_batch"] == pytest.approx(0.2)  # (0.25 + 0.2 + 0.15) / 3
    assert fig["wait_s_per_batch"] == pytest.approx(0.2667)  # 0.8 / 3, to 4 places
    assert fig["host_share"] == pytest.approx(0.2)  # 0.6 / (0.6 + 2.4)
    assert fig["steady_window"] == (104.0, 106.0)
    assert fig["steady_images_per_s"] == pytest.approx(3.0)  # (4 + 2) images over 2 s
    assert fig["device_section_busy"] == pytest.approx(0.7)  # (0.8 + 0.6) / 2

    one = profile_figures([lines[2]], run_start=100.0)  # one batch: no steady state, no load line
    assert one["batches"] == 1 and one["time_to_first_batch_s"] == pytest.approx(4.0)
    assert "steady_images_per_s" not in one and "model_load_s" not in one
    busy = [dict(r, device_s=3.0) if r["event"] == "batch" else r for r in lines]
    assert profile_figures(busy, run_start=100.0)["device_section_busy"] == 1.0  # capped
    assert profile_figures([lines[1]], run_start=100.0) == {"batches": 0, "model_load_s": 2.0,
                                                            "models_loaded_after_s": 2.5}
    assert "device_rows" not in fig  # every batch ran whole
    split = [dict(r, device_rows=rows) for r, rows in zip(lines, (0, 0, 8, 0, 4), strict=True)]
    assert profile_figures(split, run_start=100.0)["device_rows"] == 8  # the 4 was a batch of rejects only


# ---- RowBuffer.extend -------------------------------------------------------------------------


def objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def test_extend_is_add_row_by_row():
    rng = np.random.default_rng(0)
    n = 3
    per_row = {"shard": np.array(["s0", "s0", "s1"], dtype=object), "key": np.array(["a", "b", "c"], dtype=object),
               "index": np.array([4, 5, 0]), "pixels": [rng.integers(0, 256, (2, 2, 3), dtype=np.uint8) for _ in range(n)],
               "member_names": objects([("json",), (), ("txt", "cls")]),
               "member_data": objects([(b"{}",), (), (b"t", b"3")]), "psnr": np.array([30.5, np.inf, 12.0], np.float32),
               "seed": np.array([2**62, 7, 0], np.int64)}
    same = {"kind": RowKind.SAMPLE, "timesteps": [500, 250], "latent_rows": 3, "method": "dpm", "eta": 0.1}

    one_by_one = RowBuffer()
    one_by_one.add(shard="x", key="rej", kind=RowKind.REJECT, error="bad")
    for i in range(n):
        one_by_one.add(**{c: v[i] for c, v in per_row.items()}, **same)
    at_once = RowBuffer()
    at_once.add(shard="x", key="rej", kind=RowKind.REJECT, error="bad")
    at_once.extend(per_row, **same)

    want, got = one_by_one.batch(), at_once.batch()
    assert tuple(got) == OUTPUT_COLUMNS and len(at_once) == 1 + n
    assert all(got[c].dtype == np.dtype(COLUMNS[c][0]) for c in got)
    assert_batches_equal(got, want)
    assert np.isnan(got["ssim"]).all() and list(got["step"]) == [-1] * (1 + n)  # defaults of unset columns


def test_extend_refuses_unknown_columns_and_ragged_rows():
    rows = RowBuffer(PIXEL_COLUMNS)
    with pytest.raises(KeyError, match="latent"):
        rows.extend({"key": ["a"], "latent": [np.zeros(1)]})
    with pytest.raises(KeyError, match="psnr"):
        rows.extend({"key": ["a"]}, psnr=1.0)
    with pytest.raises(ValueError, match="one length"):
        rows.extend({"key": ["a", "b"], "index": [1]})
    assert len(rows) == 0 and all(v == [] for v in rows.values.values())  # nothing half-added


def test_an_edit_batch_too_large_for_the_device_runs_in_pieces_of_samples(pixel_model, tmp_path):
    """h-space edit: a UNet call of the edit walk carries 2 × scales × samples rows (ε with and without
    Δh: 30 here); a device that holds 12 rows runs the samples 2, 2, 1 and gives the whole batch's images."""
    from pipeline.config import HSpaceConfig
    from pipeline.data.directions import write_direction
    from pipeline.diffusion.hspace import trace_h
    from pipeline.stages.hspace import EditStage

    den = load_denoiser(str(pixel_model), dtype="float32")
    grid = den.schedule.grid_from(500, 4)
    h = trace_h(den, torch.zeros(1, 3, 16, 16), grid).h  # (1, K, C, h, w)
    deltas = np.random.default_rng(0).normal(0, 0.5, h.shape[1:]).astype(np.float32)
    uri = str(tmp_path / "direction.safetensors")
    write_direction(uri, None, {"deltas": deltas}, {"kind": "table", "timesteps": grid, "steps": 4, "t_edit": 500,
                                                   "t_boost": 0, "model": str(pixel_model)})
    hspace = HSpaceConfig(direction=uri, t0=500, steps=4, scales=[0.0, 1.0, 2.0])

    def stage():
        return EditStage(ModelConfig(model=str(pixel_model)), hspace, OutputConfig(latents="none"), seed=3,
                         dtype="float32")

    batch = pixel_batch(9, 5)
    whole, small = stage()(batch), stage()
    seen = out_of_memory_above(small.source, 12)
    pieces = small(batch)
    assert small.device_rows == 2 and max(seen) == 30
    assert list(pieces["key"]) == list(whole["key"]) and list(pieces["seed"]) == list(whole["seed"])
    for column in ("pixels", "extra_pixels"):
        for a, b in zip(pieces[column], whole[column], strict=True):
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1, column
