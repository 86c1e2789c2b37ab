"""`latentshift models import` (pipeline/tools/import_checkpoint.py): a checkpoint as the original code
saves it → a model folder the jobs load, whose ε and h are the ORIGINAL network's (the golden outputs of
ermongroup/ddim's ``Model``, tests/data/imports/ddpm-tiny.safetensors, made by make_ddpm_golden.py there),
and one line for every file that cannot be imported."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.data.model_store import resolve_model
from pipeline.diffusion import load_denoiser

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "imports"


def _original() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    golden = load_file(str(DATA / "ddpm-tiny.safetensors"))
    state = {k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}
    return state, {k: golden[k] for k in ("x_t", "t", "eps", "h")}


def _checkpoint(tmp_path: Path) -> Path:
    """As ermongroup/ddim's training saves it: a list whose last item is the EMA state dict, the model
    wrapped in DataParallel (``module.`` prefixes), here in float16."""
    state, _ = _original()
    path = tmp_path / "ckpt.pth"
    torch.save([{"junk": torch.zeros(1)}, {f"module.{k}": v.half() for k, v in state.items()}], path)
    return path


def _keys(tmp_path: Path) -> Path:
    path = tmp_path / "arch.json"
    path.write_text((DATA / "ddpm-tiny.json").read_text())
    return path


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_an_imported_checkpoint_runs_as_the_original_network(tmp_path, capsys):
    src, dst = _checkpoint(tmp_path), tmp_path / "imported"
    rc = main(["models", "import", str(src), str(dst), "--arch", "ddpm", "--arch-keys", str(_keys(tmp_path)),
               "--item", "-1"])
    assert rc == 0, capsys.readouterr().err
    assert "use it as source.model" in capsys.readouterr().out
    record = json.loads((dst / "latentshift-import.json").read_text())
    assert record["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() and record["family"] == "ddpm"
    assert record["source_keys"] == len(_original()[0]) and set(record["mapped"]) == set(_original()[0])

    den = load_denoiser(resolve_model(str(dst)), device="cpu", dtype="float32")
    _, golden = _original()
    h = []
    den.unet.mid_block.register_forward_hook(lambda m, i, o: h.append(o))
    eps = torch.cat([den.eps(golden["x_t"][j: j + 1], int(golden["t"][j])) for j in range(len(golden["t"]))])
    assert _rel(eps, golden["eps"]) < 1e-4  # weights stored in float16 are exactly the golden float32 ones
    assert _rel(torch.cat(h), golden["h"]) < 1e-4
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(den.schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)


def test_import_from_and_to_object_storage(tmp_path, s3, s3_server):
    s3.mkdir("ckpts")
    s3.put_file(str(_checkpoint(tmp_path)), "ckpts/tiny.pth")
    from pipeline.tools.import_checkpoint import import_checkpoint

    opts = {"endpoint_url": s3_server}
    arch = json.loads((DATA / "ddpm-tiny.json").read_text())
    record = import_checkpoint("s3://ckpts/tiny.pth", "s3://ckpts/models/tiny", arch="ddpm", arch_keys=arch,
                               storage_options=opts, item=-1)
    assert record["source"] == "s3://ckpts/tiny.pth"
    assert s3.exists("ckpts/models/tiny/unet/diffusion_pytorch_model.safetensors")
    den = load_denoiser(resolve_model("s3://ckpts/models/tiny", opts, cache_dir=tmp_path / "cache"), device="cpu")
    assert den.unet.config.sample_size == 16 and den.conditioning == "none"


class NotATensor:  # a pickled object of a class: weights_only refuses it, nothing of it runs
    def __reduce__(self):
        return (print, ("this must never run",))


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("latentshift: ")
    return err


def test_what_cannot_be_imported_is_one_line(tmp_path, capsys):
    good, keys = _checkpoint(tmp_path), str(_keys(tmp_path))
    err = _one_line_error(capsys, ["models", "import", str(good), str(tmp_path / "a"), "--preset", "celeba-hq"])
    assert "unknown preset 'celeba-hq'" in err and "celeba-hq-256" in err and "lsun-church-256" in err

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = _one_line_error(capsys, ["models", "import", str(truncated), str(tmp_path / "b"), "--arch", "ddpm",
                                   "--arch-keys", keys])
    assert "truncated.pth: not a complete PyTorch checkpoint" in err and "download it again" in err

    code = tmp_path / "code.pth"
    torch.save({"weights": NotATensor()}, code)
    err = _one_line_error(capsys, ["models", "import", str(code), str(tmp_path / "c"), "--arch", "ddpm",
                                   "--arch-keys", keys])
    assert "weights_only=True" in err and "never running code" in err
    assert "this must never run" not in capsys.readouterr().out

    err = _one_line_error(capsys, ["models", "import", str(good), str(tmp_path / "d"), "--preset",
                                   "celeba-hq-256", "--item", "-1"])  # a 16² two-level file is not the 256² preset
    assert "ckpt.pth: the checkpoint does not fit DDPM (resolution 256" in err
    assert "key(s) missing: down.0.block.1.norm1.weight" in err  # the first keys it lacks, by name

    assert main(["models", "import", str(good), str(tmp_path / "e"), "--arch", "ddpm", "--arch-keys", keys,
                 "--item", "-1"]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["models", "import", str(good), str(tmp_path / "e"), "--arch", "ddpm",
                                   "--arch-keys", keys, "--item", "-1"])
    assert "already holds a model" in err


def test_an_imported_class_conditional_adm_with_learned_sigma_runs_as_the_original(tmp_path, capsys):
    """guided-diffusion's UNetModel (tests/data/imports/adm-tiny-cond.*, made by make_adm_golden.py): ε is
    the first 3 of its 6 output channels, with the class label as the original took it."""
    golden = load_file(str(DATA / "adm-tiny-cond.safetensors"))
    src, dst = tmp_path / "ema_0.9999.pt", tmp_path / "adm"
    torch.save({k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}, src)
    keys = tmp_path / "adm.json"
    keys.write_text((DATA / "adm-tiny-cond.json").read_text())
    assert main(["models", "import", str(src), str(dst), "--arch", "adm", "--arch-keys", str(keys)]) == 0, \
        capsys.readouterr().err
    record = json.loads((dst / "latentshift-import.json").read_text())
    assert record["family"] == "adm" and record["mapped"]["middle_block.1.qkv.weight"].endswith("to_q|to_k|to_v.weight")

    den = load_denoiser(resolve_model(str(dst)), device="cpu", dtype="float32")
    assert den.learned_variance and den.conditioning == "class" and den.unet.config.out_channels == 6
    h = []
    den.unet.mid_block.register_forward_hook(lambda m, i, o: h.append(o))
    x, t, y = golden["input.x_t"], golden["input.t"], golden["input.y"]
    eps = torch.cat([den.eps(x[j: j + 1], int(t[j]), condition=int(y[j])) for j in range(len(t))])
    assert _rel(eps, golden["expected.out"][:, :3]) < 1e-4
    assert _rel(torch.cat(h), golden["expected.h"]) < 1e-4
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(den.schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)


def test_translate_from_an_imported_ddpm_to_an_imported_learned_sigma_adm(ray_cluster, tmp_path):
    """A whole job on the papers' families: DPM-Encoder with the imported DDPM, decoding with the imported
    ADM (6 output channels), as CycleDiffusion translates AFHQ cat → dog; exactly once, with provenance."""
    import io

    from shard_builders import good_samples

    from pipeline.config import validate
    from pipeline.data.shards import iter_tar_samples, write_samples
    from pipeline.jobs import run_job

    ddpm_dst = tmp_path / "ddpm"
    assert main(["models", "import", str(_checkpoint(tmp_path)), str(ddpm_dst), "--arch", "ddpm",
                 "--arch-keys", str(_keys(tmp_path)), "--item", "-1"]) == 0
    golden = load_file(str(DATA / "adm-tiny.safetensors"))
    torch.save({k.removeprefix("model."): v for k, v in golden.items() if k.startswith("model.")}, tmp_path / "a.pt")
    (tmp_path / "adm.json").write_text((DATA / "adm-tiny.json").read_text())
    assert main(["models", "import", str(tmp_path / "a.pt"), str(tmp_path / "adm"), "--arch", "adm",
                 "--arch-keys", str(tmp_path / "adm.json")]) == 0
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "cats.tar", "wb") as f:
        write_samples(f, good_samples(7, 3))
    cfg = validate({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                    "source": {"model": str(ddpm_dst)}, "target": {"model": str(tmp_path / "adm")},
                    "image": {"size": 16}, "sampler": {"method": "dpm", "steps": 10, "eta": 0.1, "strength": 0.5,
                                                       "clip_x0": "off"}})
    summary = run_job(cfg, "translate")
    assert summary["images"] == 3 and summary["rejected"] == 0
    samples = list(iter_tar_samples(io.BytesIO((tmp_path / "out" / "images" / "cats.tar").read_bytes())))
    assert len(samples) == 3
    prov = json.loads(samples[0].members["latentshift.json"])
    assert prov["target_model"] == str(tmp_path / "adm") and prov["source_model"] == str(ddpm_dst)
    assert run_job(cfg, "translate")["shards_done"] == 0  # committed once
