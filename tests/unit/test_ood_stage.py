"""InvertAndFitStage without Ray: the driver's merge of its PARTIAL rows is the exact fit, and an
actor forwards only the latents that enter its own reservoir, not every latent."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ModelConfig, OODConfig, OutputConfig
from pipeline.data.rows import PIXEL_COLUMNS, RowBuffer, RowKind, rows_of
from pipeline.diffusion import ddim_invert_model_space
from pipeline.diffusion.ood import MomentFit, Reservoir
from pipeline.stages.ood import InvertAndFitStage, partial_from_bytes


def pixel_batch(start: int, n: int) -> dict:
    rng = np.random.default_rng(start)
    rows = RowBuffer(PIXEL_COLUMNS)
    for i in range(start, start + n):
        rows.add(shard="s", key=f"k{i:03d}", index=i, kind=RowKind.SAMPLE,
                 pixels=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    rows.add(shard="s", key="bad", index=start + n, kind=RowKind.REJECT, error="undecodable image")
    return rows.batch()


def test_partial_fits_merge_to_the_exact_fit_and_forward_few_latents(pixel_model):
    stage = InvertAndFitStage(ModelConfig(model=str(pixel_model)), OODConfig(t0=500, inversion_steps=4, reservoir=3),
                              OutputConfig(latents="none"), dtype="float32")
    moments, reservoir, forwarded, latents, keys = MomentFit(), Reservoir(3), 0, [], []
    for start in range(0, 40, 5):
        out = stage(pixel_batch(start, 5))
        assert len(rows_of(out, RowKind.REJECT)) == 1 and len(rows_of(out, RowKind.SAMPLE)) == 5
        (p,) = rows_of(out, RowKind.PARTIAL)
        m, r, shape, grid = partial_from_bytes(out["partial"][p], 3)
        moments, reservoir = moments.merge(m), reservoir.merge(r)
        forwarded += len(r.priorities)
        # the same inversion, for the reference fit below
        x0 = torch.from_numpy(np.stack(pixel_batch(start, 5)["pixels"][:5])).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents.append(ddim_invert_model_space(stage.source, x0, timesteps=grid).x_start.reshape(5, -1))
        keys += [f"s/k{i:03d}" for i in range(start, start + 5)]
    every = torch.cat(latents)
    direct = Reservoir(3).offer(every, keys)
    assert moments.count == 40 and torch.allclose(moments.mean, every.double().mean(0), atol=1e-6)
    assert reservoir.priorities == direct.priorities and torch.allclose(reservoir.latents, direct.latents, atol=1e-6)
    assert forwarded < 20  # 9 here: only reservoir entrants travel to the driver, not all 40 latents
    assert shape == (3, 16, 16)


def test_the_ood_section_maps_to_candidate_settings():
    import torch

    from pipeline.config import OODConfig
    from pipeline.diffusion.ood import GeometryWindow, OODStats, measure_geometry
    from pipeline.stages.ood import candidate_settings

    ref = torch.randn(40, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = OODStats(ref.mean(0), torch.ones(1), ref, measure_geometry(ref))
    assert candidate_settings(OODConfig(geometric=False), stats).selection == "none"
    plain = candidate_settings(OODConfig(), stats)
    assert (plain.mode, plain.selection, plain.tolerance, plain.optimise_steps) == ("gaussian", "tolerance", 2.0, 0)
    official = candidate_settings(OODConfig(selection="window", window="official", candidates="slerp"), stats)
    assert official.window == GeometryWindow() and official.mode == "slerp" and official.weight is None
    calibrated = candidate_settings(OODConfig(selection="window", window_coverage=0.8), stats).window
    assert calibrated.distance > GeometryWindow().distance  # 64 dimensions: far wider than the official 0.05 %
    assert candidate_settings(OODConfig(optimise_steps=3, optimise_lr=0.1), stats).optimise_steps == 3


def test_two_batches_in_flight_still_merge_to_the_exact_fit(pixel_model, tmp_path, monkeypatch):
    """Ray runs two batches per actor at once (concurrent_batches = 2); the reservoir is updated
    under the device lock, so the driver's merge stays exact whatever order the batches take."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.profile import ENV, read_profile

    monkeypatch.setenv(ENV, str(tmp_path))
    assert InvertAndFitStage.concurrent_batches == 2
    stage = InvertAndFitStage(ModelConfig(model=str(pixel_model)), OODConfig(t0=500, inversion_steps=4, reservoir=3),
                              OutputConfig(latents="start", latent_dtype="float32"), dtype="float32")
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(stage, [pixel_batch(start, 5) for start in range(0, 30, 5)]))
    moments, reservoir, keys, starts = MomentFit(), Reservoir(3), [], []
    for out in outs:
        (p,) = rows_of(out, RowKind.PARTIAL)
        m, r, _, grid = partial_from_bytes(out["partial"][p], 3)
        moments, reservoir = moments.merge(m), reservoir.merge(r)
        lat = rows_of(out, RowKind.LATENT)
        assert list(out["key"][lat]) == list(out["key"][rows_of(out, RowKind.SAMPLE)])  # one start map each
        starts += [torch.from_numpy(np.asarray(out["latent"][i], dtype=np.float32)).reshape(-1) for i in lat]
        keys += [f"s/{k}" for k in out["key"][lat]]
    every = torch.stack(starts)
    x0 = torch.from_numpy(np.stack([b["pixels"][i] for s in range(0, 30, 5) for b in [pixel_batch(s, 5)]
                                    for i in range(5)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    peer = ddim_invert_model_space(stage.source, x0, timesteps=grid).x_start.reshape(30, -1)
    assert torch.allclose(every, peer, atol=1e-5)  # each batch's latents are its own images' inversions
    direct = Reservoir(3).offer(every, keys)
    assert moments.count == 30 and torch.allclose(moments.mean, every.double().mean(0), atol=1e-6)
    assert reservoir.priorities == direct.priorities and torch.allclose(reservoir.latents, direct.latents, atol=1e-6)
    batches = [r for r in read_profile(tmp_path) if r["event"] == "batch"]  # what `latentshift bench` splits
    assert len(batches) == 6 and all(r["device_s"] > 0 and r["host_s"] > 0 and r["samples"] == 5 for r in batches)


def test_sample_decode_regenerates_and_decodes_each_candidate_alone_or_batched(pixel_model, tmp_path):
    """Candidates are made in ``prepare`` (host) and decoded in ``compute``: each row's image is the
    DDIM decode of its own candidate latent, the same in any batch, with two batches in flight."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.stats import read_stats, write_stats
    from pipeline.diffusion import Latent, ddim_decode_model_space, load_denoiser
    from pipeline.diffusion.ood import CandidateSettings, candidate_latents, ood_grid
    from pipeline.stages.ood import SampleDecodeStage, ood_stats
    from pipeline.stages.tensors import to_uint8

    shape, g = (3, 16, 16), torch.Generator().manual_seed(0)
    ref = torch.randn(12, 3 * 16 * 16, generator=g, dtype=torch.float64)
    stage_grid = ood_grid(load_denoiser(pixel_model, dtype="float32").schedule, 500, 4)
    uri = str(tmp_path / "stats.safetensors")
    write_stats(uri, None, {"mean": ref.mean(0).numpy(), "variance": np.ones(1), "reference": ref.float().numpy()},
                {"shape": list(shape), "timesteps": stage_grid})
    stage = SampleDecodeStage(ModelConfig(model=str(pixel_model)), OutputConfig(latents="none"), run_seed=7,
                              stats_uri=uri, stats_options={}, candidates={"selection": "none"}, dtype="float32")
    assert SampleDecodeStage.concurrent_batches == 2

    def batch(cands):
        rows = RowBuffer()
        for c in cands:
            rows.add(shard="sampled-00000", key=f"{c:06d}", index=c, kind=RowKind.SAMPLE, candidate=c)
        return rows.batch()

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(stage, [batch([0, 1, 2]), batch([3, 4]), batch([5])]))
    alone = stage(batch([4]))
    stats = ood_stats(*read_stats(uri))
    x = candidate_latents(stats, 7, range(6), CandidateSettings(selection="none")).float().reshape(6, *shape)
    z = Latent(x, x.new_zeros((6, 0, *shape)), stage_grid, method="ddim", eta=0.0, seeds=list(range(6)))
    peer = to_uint8(stage.source.to_pixels(ddim_decode_model_space(stage.source, z)))
    got = np.stack([p for out in outs for p in out["pixels"]])
    assert [int(c) for out in outs for c in out["candidate"]] == list(range(6))
    assert [int(c) for out in outs for c in out["seed"]] == list(range(6))
    assert np.abs(got.astype(int) - peer.astype(int)).max() <= 1
    assert np.array_equal(alone["pixels"][0], got[4])
