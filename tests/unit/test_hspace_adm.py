"""h-space on ADM / improved-DDPM U-Nets: Asyrp's DeltaBlock variant (GroupNorm + SiLU before the first
conv, guided-diffusion's GroupNorm32) against the official module written out, and chosen for a
scale-shift-norm U-Net (an imported ADM), never for a DDPM one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from pipeline.diffusion.hspace import DeltaBlock, uses_scale_shift_norm

pytestmark = pytest.mark.unit


class GroupNorm32(nn.GroupNorm):  # guided-diffusion nn.py:18-20: computed in float32
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class OfficialADMDeltaBlock(nn.Module):
    """Asyrp_official models/improved_ddpm/unet.py:776-855 as built at :769-773 (channels=ch,
    emb_channels=4·model_channels, dropout 0; so use_scale_shift_norm False and out_channels = ch)."""

    def __init__(self, channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(channels, channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.out_layers(h + emb_out)


def test_the_adm_delta_block_is_the_official_one():
    torch.manual_seed(0)
    official = OfficialADMDeltaBlock(64, 128).eval()
    for p in official.parameters():
        nn.init.normal_(p, std=0.3)
    ours = DeltaBlock(64, 128, pre_norm=True).eval()
    ours.load_state_dict({
        "norm1.weight": official.in_layers[0].weight, "norm1.bias": official.in_layers[0].bias,
        "conv1.weight": official.in_layers[2].weight, "conv1.bias": official.in_layers[2].bias,
        "temb_proj.weight": official.emb_layers[1].weight, "temb_proj.bias": official.emb_layers[1].bias,
        "norm2.weight": official.out_layers[0].weight, "norm2.bias": official.out_layers[0].bias,
        "conv2.weight": official.out_layers[3].weight, "conv2.bias": official.out_layers[3].bias,
    })
    h, emb = torch.randn(3, 64, 8, 8) * 2 + 1, torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(h, emb, 500), official(h, emb), rtol=1e-5, atol=1e-5)
    assert ours.norm1.eps == ours.norm2.eps == 1e-5  # GroupNorm32's default, not DDPM's 1e-6


def _unet(scale_shift: bool) -> UNet2DModel:
    return UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       resnet_time_scale_shift="scale_shift" if scale_shift else "default", attn_norm_num_groups=32)


def test_the_variant_follows_the_unet_and_the_direction_file():
    adm, ddpm = _unet(True), _unet(False)
    assert uses_scale_shift_norm(adm) and not uses_scale_shift_norm(ddpm)
    block = DeltaBlock.for_unet(adm)
    assert block.norm1 is not None and DeltaBlock.for_unet(ddpm).norm1 is None
    # a trained ADM block written to a direction file comes back as the same variant (stages/hspace.py)
    from types import SimpleNamespace

    from pipeline.stages.hspace import direction_from_file

    tensors = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    header = {"kind": "delta-block", "channels": 64, "temb_channels": 128, "model": "adm"}
    den = SimpleNamespace(unet=adm, device=torch.device("cpu"), source="adm")
    loaded = direction_from_file(tensors, header, den)
    assert loaded.norm1 is not None
    h, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 128)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(h, emb, 10).numpy(), block(h, emb, 10).numpy(), rtol=1e-6, atol=1e-6)
