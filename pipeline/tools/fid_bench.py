"""``latentshift bench --fid``: what FID/KID features cost per 1000 images, on this machine's device.

The eval job's device work per batch (pipeline/stages/features.py), alone: uint8 256² images from pinned
host memory to the device, the clean resize there (``DeviceResize``), the FID Inception network (random
weights: the cost does not depend on them) in float32. One batch first to warm up (cuDNN's choices), then
the figures: images/s and seconds per 1000 images, and the resize's share.
"""

from __future__ import annotations

import sys
import time

import torch

from pipeline.metrics.feature_net import FIDInception
from pipeline.metrics.fid import DeviceResize


def _random_weights(net: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(".var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 4:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_fid_bench(images: int = 512, batch_size: int = 64, size: int = 256, out=sys.stdout) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, resize = _random_weights(FIDInception()).eval().to(device), DeviceResize()
    host = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    host = host.pin_memory() if device.type == "cuda" else host
    net(resize(host.to(device)))  # warm-up
    batches = max(1, images // batch_size)
    resize_s = total_s = 0.0
    for _ in range(batches):
        _sync(device)
        t0 = time.perf_counter()
        x = resize(host.to(device, non_blocking=True))
        _sync(device)
        t1 = time.perf_counter()
        net(x).cpu()
        t2 = time.perf_counter()
        resize_s, total_s = resize_s + (t1 - t0), total_s + (t2 - t0)
    n = batches * batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    r = {"device": name, "images": n, "batch_size": batch_size, "size": size,
         "images_per_second": round(n / total_s, 2), "seconds_per_1000": round(1000 * total_s / n, 2),
         "resize_share": round(resize_s / total_s, 3)}
    out.write(f"bench --fid  {name}: {r['images_per_second']} images/s ({size}² → 299², batch {batch_size}, {n} images), "
              f"{r['seconds_per_1000']} s per 1000 images, resize {100 * r['resize_share']:.1f}% of it\n")
    return r
