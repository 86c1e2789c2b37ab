"""Tiny random-weight CLIP and LPIPS networks, built offline, for tests and offline smoke runs.

``save_random_clip`` writes an open_clip model-config JSON and a safetensors checkpoint that
``pipeline.metrics.clip.load_clip`` accepts (a ViT of 32 px images, 8 px patches, width 32, two
layers and heads; CLIP's real tokenizer and 77-token context, so any prompt encodes).
``save_random_lpips`` writes a whole LPIPS network (random backbone and linear layers) in the format
``pipeline.metrics.lpips_net.load_lpips`` reads. Random weights measure nothing; they only make the
code paths run without a download.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

# open_clip model-config layout (open_clip/model_configs/*.json); vision heads = width / head_width
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_random_clip(folder, seed: int = 0) -> tuple[str, str]:
    """Write ``tiny-random-clip.json`` and ``tiny-random-clip.safetensors`` into ``folder``;
    return (config path, weights path)."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny-random-clip.json"
    weights = folder / "tiny-random-clip.safetensors"
    config.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(weights))
    return str(config), str(weights)


def random_lpips(net: str = "alex", seed: int = 0):
    """A random-weight ``lpips.LPIPS`` (nothing downloaded). Its linear layers are made
    non-negative, as trained LPIPS clamps them, so distances are ≥ 0 as with the real network."""
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # pretrained= kwarg
        model = lpips.LPIPS(pretrained=False, pnet_rand=True, net=net, verbose=False)
    with torch.no_grad():
        for lin in model.lins:
            for p in lin.parameters():
                p.abs_()
    return model.eval()


def save_random_lpips(path, net: str = "alex", seed: int = 0) -> str:
    """Write a random LPIPS network's whole state dict to the safetensors file ``path``."""
    from pipeline.metrics.lpips_net import save_lpips

    return save_lpips(random_lpips(net, seed), path, net)
