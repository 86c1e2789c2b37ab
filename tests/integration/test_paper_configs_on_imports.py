"""The paper configs that run on the papers' own checkpoints (configs/paper/asyrp-*, afhq-*,
unseen-discoverydiff) pass preflight on models imported by `latentshift models import` from files of
the presets they name, at full size (zero weights: preflight reads layouts and safetensors headers),
and walk the grids their comments state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.diffusion.imports import adm, ddpm
from pipeline.jobs import get
from pipeline.runtime.models import check_models
from pipeline.tools.import_checkpoint import import_checkpoint

pytestmark = pytest.mark.integration

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
# config → (job, the preset its comment names)
CONFIGS = {"asyrp-celeba-smiling-train.yaml": ("direction-fit", "celeba-hq-256"),
           "asyrp-celeba-smiling-edit.yaml": ("edit", "celeba-hq-256"),
           "afhq-cat2dog.yaml": ("translate", "afhq-256"), "afhq-wild2dog.yaml": ("translate", "afhq-256"),
           "unseen-discoverydiff.yaml": ("ood-fit", "afhq-256")}


def _published_file(preset: str, path: Path) -> Path:
    """A file shaped as the published one (keys and shapes of the original network), zero weights, float16."""
    if preset in ddpm.PRESETS:
        shapes = {k: shape for k, (_, shape) in ddpm.key_map(ddpm.preset(preset)).items()}
    else:
        shapes = adm.source_shapes(adm.preset(preset))
    torch.save({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, path)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imports")
    out = {}
    for preset in sorted({p for _, p in CONFIGS.values()}):
        src = _published_file(preset, root / f"{preset}.pt")
        import_checkpoint(str(src), str(root / preset), preset=preset)
        src.unlink()
        out[preset] = root / preset
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_config_passes_preflight_on_its_imported_model(name, imported):
    from diffusers import DDIMScheduler

    from pipeline.data.model_store import resolve_model
    from pipeline.diffusion.schedule import schedule_from_scheduler
    from pipeline.jobs.checks import check_condition_fits

    job, preset = CONFIGS[name]
    text = (PAPER / name).read_text()
    assert f"--preset {preset}" in " ".join(text.replace("#", " ").split())  # the comment names the import
    cfg = load_config(PAPER / name)
    folder = str(imported[preset])
    update = {"source": cfg.source.model_copy(update={"model": folder})}
    if "target" in get(job).models:
        update["target"] = cfg.target.model_copy(update={"model": folder})
    cfg = cfg.model_copy(update=update)
    check_models(get(job), cfg)  # layout, safetensors only, every header fits its config
    check_condition_fits(cfg, resolve_model(folder))  # unconditional models, no condition
    schedule = schedule_from_scheduler(DDIMScheduler.from_pretrained(Path(folder) / "scheduler"))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)
    if name.startswith("afhq"):  # "a 1000-step grid (999 … 0)", "start at t = 849"
        grid = schedule.grid(cfg.sampler.steps, cfg.sampler.strength)
        assert (grid[0], grid[-1], len(grid)) == (849, 0, 850)
    if name.startswith("asyrp"):  # the official linspace grid from 999 to 0 fits the imported schedule
        from pipeline.diffusion.hspace import hspace_grid

        grid = hspace_grid(schedule, cfg.hspace.t0, cfg.hspace.steps, cfg.hspace.grid)
        assert grid[0] == 999 and grid[-1] == 0
