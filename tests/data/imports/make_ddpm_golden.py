"""Make ``ddpm-tiny.safetensors``: golden data for ``tests/unit/test_import_ddpm.py`` from the ORIGINAL
DDPM network, ``Model`` in ermongroup/ddim ``models/diffusion.py`` (commit
e8df66cf02e457719930748b5c26e37e3126dfdd; the class is defined at models/diffusion.py:192-341, its
forward at :301-341 and the middle block ``mid.block_2`` at :263-266 / :325). SDEdit, DiffusionCLIP,
Asyrp (kwonminki/Asyrp_official models/ddpm/diffusion.py) and CycleDiffusion
(ChenWu98/cycle-diffusion model/lib/ddpm_ddim/models/ddpm/diffusion.py ``DDPM``) carry the same class.

NOT run by the tests: it needs the upstream code. To remake the file::

    git clone https://github.com/ermongroup/ddim /tmp/ref-ddim   # then check out the commit above
    python tests/data/imports/make_ddpm_golden.py /tmp/ref-ddim

It builds a tiny random instance with the architecture keys in ``ddpm-tiny.json``: 16x16 images,
ch 32 (GroupNorm's 32 groups are the floor), ch_mult [1, 2] (two levels, so one down- and one
up-sampler; widths 32 and 64, so ``nin_shortcut`` occurs on both paths), 1 res block per level (the
published 2 would take the file to 1.9 MB; the up path still has 2 per level, ``num_res_blocks + 1``),
attention at 16 (the first level: attention blocks in ``down.0``/``up.0`` and none in
``down.1``/``up.1``; the middle block always has one), ``resamp_with_conv`` true and dropout 0.0 as
published, eval mode. It perturbs every parameter (GroupNorm scales and biases included, so a
mis-mapped norm shows) and stores, all under fixed seeds:

- ``model.<key>``: the state dict, keys exactly as the original names them, prefixed ``model.``.
  The values are stored as float16 to keep the file small (1.4 MB; 2.7 MB in float32): the generator
  rounds every weight to float16 BEFORE running the original model, so the float16 values widened
  back to float32 are exactly the float32 weights the expected outputs were computed with (the test
  widens them, which also exercises the float16 path of ``normalise``);
- ``x_t`` (2, 3, 16, 16) and ``t`` (2,) int64 = [17, 803]: the input, float32;
- ``eps`` (2, 3, 16, 16): the model's output (all output channels), float32;
- ``h`` (2, 64, 8, 8): the output of ``mid.block_2`` (forward hook), float32.

Why not all widths 32 (a file under 1 MB): with 32 channels GroupNorm(32) normalises each channel on
its own, which cancels the per-channel time-embedding term a resnet adds before ``norm2``
(diffusion.py:121-123): such a network ignores t entirely and its golden ε would not test the time
embedding (a width-32 draft of this file did not). The 64-wide level and middle block (2 channels a
group) make ε and h depend on t; ``test_the_golden_data_sees_the_time_embedding_and_the_padding`` holds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ARCH = json.loads((HERE / "ddpm-tiny.json").read_text())


def namespace(d):
    return types.SimpleNamespace(**{k: namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ddim_repo", help="a checkout of ermongroup/ddim")
    args = parser.parse_args()
    sys.path.insert(0, args.ddim_repo)
    from models.diffusion import Model  # the original class

    config = namespace({
        "model": {
            "type": "simple", "ch": ARCH["ch"], "out_ch": ARCH["out_ch"], "ch_mult": ARCH["ch_mult"],
            "num_res_blocks": ARCH["num_res_blocks"], "attn_resolutions": ARCH["attn_resolutions"],
            "dropout": ARCH["dropout"], "in_channels": ARCH["in_channels"],
            "resamp_with_conv": ARCH["resamp_with_conv"],
        },
        "data": {"image_size": ARCH["resolution"]},
        "diffusion": {"num_diffusion_timesteps": 1000},
    })
    torch.manual_seed(2026)
    model = Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].startswith("norm") and name.endswith(".weight"):  # GroupNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.02 * torch.randn_like(p))
            p.copy_(p.half().float())  # the stored float16 value IS the weight
    gen = torch.Generator().manual_seed(7)
    x_t = torch.randn(2, ARCH["in_channels"], ARCH["resolution"], ARCH["resolution"], generator=gen)
    t = torch.tensor([17, 803], dtype=torch.int64)
    captured = {}
    hook = model.mid.block_2.register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out.detach()))
    with torch.no_grad():
        eps = model(x_t, t)
    hook.remove()
    tensors = {f"model.{k}": v.detach().half().contiguous() for k, v in model.state_dict().items()}
    tensors.update(x_t=x_t.contiguous(), t=t, eps=eps.contiguous(), h=captured["h"].contiguous())
    out = HERE / "ddpm-tiny.safetensors"
    save_file(tensors, str(out), metadata={
        "source": "ermongroup/ddim@e8df66cf02e457719930748b5c26e37e3126dfdd models/diffusion.py Model",
        "state_dict_prefix": "model.",
        "weights_dtype": "float16 (exact float32 weights of the run)",
    })
    print(out, out.stat().st_size, "bytes;", "eps", tuple(eps.shape), "h", tuple(captured["h"].shape))


if __name__ == "__main__":
    main()
