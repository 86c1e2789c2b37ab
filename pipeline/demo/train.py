"""Train the bundled demo DDPMs (one per shape domain) on images generated on the fly.

Hyper-parameters (recorded in the saved folder's ``training.json``): a 0.64M-parameter
UNet2DModel at 32×32 (channels 16/32/64, one ResNet layer per level, no attention: sized so
a few thousand steps fit on a 2-core CPU), DDPM linear β schedule over 1000 steps
(ε-prediction), AdamW (lr 1e-3 cosine to 2e-5 after a 200-step warm-up, wd 0), batch 64, EMA 0.999 of the
weights (the EMA is what ships), gradient clipping at 1. Each step draws fresh images from
``pipeline.demo.shapes`` with a per-step seed, so a run is reproducible and resumable.
Checkpoints (safetensors weights + optimizer state) every ``--checkpoint-every`` steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    domain: str
    out: str
    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    channels: tuple[int, ...] = (16, 32, 64)


def demo_unet(channels=(16, 32, 64)):
    from diffusers import UNet2DModel

    levels = len(channels)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels, norm_num_groups=8,
    )


def demo_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, prediction_type="epsilon")


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 2e-5 + 0.5 * (cfg.lr - 2e-5) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_images(domain: str, n: int, step: int, seed: int) -> torch.Tensor:
    from pipeline.demo.shapes import render

    images, _ = render(domain, n, seed=seed * 1_000_003 + step)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _save_checkpoint(path: Path, step: int, model, ema, opt) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path / "model.safetensors")
    save_file(ema.state_dict(), path / "ema.safetensors")
    torch.save(opt.state_dict(), path / "optimizer.pt.tmp")
    (path / "optimizer.pt.tmp").replace(path / "optimizer.pt")
    (path / "step.json").write_text(json.dumps({"step": step}))


def train(cfg: TrainConfig, resume: bool = True, progress: bool = True) -> dict:
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt = out.parent / f".{out.name}-checkpoint"
    model, ema = demo_unet(cfg.channels), demo_unet(cfg.channels)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = demo_scheduler()
    alphas = sched.alphas_cumprod
    start = 0
    if resume and (ckpt / "step.json").exists():
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start = json.loads((ckpt / "step.json").read_text())["step"]
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc=f"train {cfg.domain}")
    for step in bar:
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # per-step randomness: resumable, reproducible
        x0 = batch_images(cfg.domain, cfg.batch, step, cfg.seed)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM eq. 4
        loss = F.mse_loss(model(x_t, t).sample, noise)  # ε-prediction (DDPM eq. 14)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - cfg.ema)
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(ckpt, step + 1, model, ema, opt)
    final_loss = sum(losses[-200:]) / max(1, len(losses[-200:])) if losses else float("nan")
    DDPMPipeline(unet=ema, scheduler=demo_scheduler()).save_pretrained(out, safe_serialization=True)
    where = out.resolve()
    shown = where.relative_to(Path.cwd()) if where.is_relative_to(Path.cwd()) else Path(where.name)
    record = {**asdict(cfg), "out": str(shown), "final_loss_last200": final_loss, "seconds_this_run": round(time.time() - t0, 1),
              "resumed_from": start, "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record
