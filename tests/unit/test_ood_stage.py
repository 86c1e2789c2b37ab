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
