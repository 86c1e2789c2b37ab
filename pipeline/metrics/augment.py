"""DiffAugment: differentiable colour, translation and cutout augmentations, batched, on the device.

Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"; the official code is
mit-han-lab/data-efficient-gans DiffAugment_pytorch.py (cited as DiffAugment_pytorch.py:LINE). Written
here by hand with the same operations and ranges, on images in [-1, 1] as there (a GAN's output):

  color        brightness x + (u − ½)                               (:21-23)
               saturation (x − mean_c x)·2u + mean_c x               (:26-29)
               contrast   (x − mean x)·(u + ½) + mean x              (:32-35)
  translation  shift by an integer in [−H/8, H/8] × [−W/8, W/8], zeros (mid grey) fill   (:38-51)
  cutout       zero a (H/2 × W/2) box centred anywhere in the image, clipped at its borders (:54-68)

applied in that order (AUGMENT_FNS, :71-75). Every op is differentiable w.r.t. the pixels (affine maps,
gathers, masks), which is what lets a guidance energy average over them (CycleDiffusion's E_CLIP).

Randomness: the official code draws from torch's global generator. Here an op takes its uniforms ``u``
(one row of ``param_count(policy)`` numbers per image) and ``draw_params`` makes them from per-sample
integer keys, one CPU ``torch.Generator`` per key. Why keys and not one generator for the batch: a
shared generator hands a sample different augmentations depending on its position in the batch and on
which other samples share it, so its gradient and its final image would change with
``runtime.batch_size`` or the actor count; with keys (derived from the sample's seed and the Langevin
step) a sample's augmentations are its own, as its noise is (DESIGN.md: "a sample's noise depends only
on (seed, key), never on its batch"). CPU generators also give the same numbers whatever device the
images are on (CUDA generators do not). The cost is a few numbers per sample per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# uniforms each op of a policy consumes, in order (brightness, saturation, contrast | dx, dy | cx, cy)
PARAMS = {"color": 3, "translation": 2, "cutout": 2}
TRANSLATION_DIVISOR = 8  # DiffAugment_pytorch.py:38-39, ratio=[1, 8]: shifts up to H // 8
CUTOUT_DIVISOR = 2  # DiffAugment_pytorch.py:54-55, ratio=[1, 2]: a box of H // 2 × W // 2


def param_count(policy: Sequence[str]) -> int:
    """Uniforms one augmentation of ``policy`` needs per image."""
    unknown = [p for p in policy if p not in PARAMS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; the ops are {', '.join(PARAMS)}")
    return sum(PARAMS[p] for p in policy)


def draw_params(keys: Sequence[int], count: int, policy: Sequence[str], device=None) -> torch.Tensor:
    """(B, count, P) uniforms in [0, 1): row b comes from ``keys[b]`` alone (one CPU generator per key)."""
    p = param_count(policy)
    rows = []
    for key in keys:
        g = torch.Generator().manual_seed(int(key) & (2**63 - 1))
        rows.append(torch.rand((count, p), generator=g))
    out = torch.stack(rows) if rows else torch.zeros((0, count, p))
    return out.to(device) if device is not None else out


def diff_augment(x: torch.Tensor, policy: Sequence[str], u: torch.Tensor) -> torch.Tensor:
    """Augment images (N, C, H, W) in [-1, 1] with ``policy`` and uniforms ``u`` (N, param_count);
    an empty policy returns ``x`` itself."""
    if not policy:
        return x
    if u.shape != (x.shape[0], param_count(policy)):
        raise ValueError(f"need uniforms of shape {(x.shape[0], param_count(policy))}, got {tuple(u.shape)}")
    u = u.to(x.device, x.dtype)
    at = 0
    for op in policy:
        n = PARAMS[op]
        x = _OPS[op](x, u[:, at:at + n])
        at += n
    return x


def color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness, saturation, contrast (DiffAugment_pytorch.py:21-35)."""
    b, s, c = (u[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = x + (b - 0.5)  # brightness: ± ½ on [-1, 1] (:22)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (s * 2) + mean_c  # saturation × [0, 2) around the grey of each pixel (:27-28)
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (c + 0.5) + mean  # contrast × [½, 3/2) around the image mean (:33-34)


def translation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Integer shift, uncovered pixels 0 (DiffAugment_pytorch.py:38-51: pad by one zero, clamp the index).

    out[i, j] = x[i + dy, j + dx] where inside, else 0; dy uniform on {−H//8 … H//8} (torch.randint there).
    """
    n, _, h, w = x.shape
    sh, sw = h // TRANSLATION_DIVISOR, w // TRANSLATION_DIVISOR
    dy = (u[:, 0] * (2 * sh + 1)).floor().long().clamp(max=2 * sh) - sh  # u < 1, clamp guards rounding
    dx = (u[:, 1] * (2 * sw + 1)).floor().long().clamp(max=2 * sw) - sw
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1) + 1).clamp(0, h + 1)  # (N, H)
    cols = (torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1) + 1).clamp(0, w + 1)  # (N, W)
    padded = F.pad(x, [1, 1, 1, 1])  # the zero border every out-of-range index lands on (:49)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)  # (N,H,W,C) → NCHW


def cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Zero an (H//2 × W//2) box (DiffAugment_pytorch.py:54-68): its centre offset uniform on
    {0 … H − (size mod 2 == 1)}, rows offset − size//2 … offset − size//2 + size − 1 clipped to the image."""
    n, _, h, w = x.shape
    ch, cw = h // CUTOUT_DIVISOR, w // CUTOUT_DIVISOR
    oy = (u[:, 0] * (h + 1 - ch % 2)).floor().long().clamp(max=h - ch % 2)  # randint(0, H + (1 − size % 2)) (:56)
    ox = (u[:, 1] * (w + 1 - cw % 2)).floor().long().clamp(max=w - cw % 2)
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    top, left = (oy - ch // 2).view(n, 1), (ox - cw // 2).view(n, 1)
    in_r = (r >= top) & (r < top + ch)  # (N, H)
    in_c = (c >= left) & (c < left + cw)  # (N, W)
    mask = 1 - (in_r.view(n, h, 1) & in_c.view(n, 1, w)).to(x.dtype)  # (:65-67)
    return x * mask.unsqueeze(1)


_OPS = {"color": color, "translation": translation, "cutout": cutout}


def augment(x: torch.Tensor, policy: Sequence[str], keys: Sequence[int], count: int) -> torch.Tensor:
    """``count`` augmentations of each image: (B, C, H, W) → (B·count, C, H, W), sample-major
    (rows b·count … b·count + count − 1 are image b's), augmentation l of image b from ``keys[b]``."""
    if len(keys) != x.shape[0]:
        raise ValueError(f"got {len(keys)} augmentation keys for a batch of {x.shape[0]}")
    u = draw_params(keys, count, policy, x.device)
    reps = x.repeat_interleave(count, dim=0)
    return diff_augment(reps, policy, u.reshape(-1, u.shape[-1]))
