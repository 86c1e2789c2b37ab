"""DiffAugment: differentiable colour, translation, resize and cutout augmentations, batched, on the device.

Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training". The guidance code
(ChenWu98/unified-generative-zoo) vendors it with a resize op added: model/lib/diffaug/DiffAugment_pytorch.py,
cited here as DiffAugment_pytorch.py:LINE. Written here by hand with the same operations, ranges and
sizes, on the images the zoo's CLIP energy augments: in [0, 1] (its generator wrappers' post_process,
latentdiff_wrapper.py:200-202), so a fill of 0 is black and brightness moves by up to ½ of the range:

  color        brightness x + (u − ½)                               (:23-25)
               saturation (x − mean_c x)·2u + mean_c x               (:28-31)
               contrast   (x − mean x)·(u + ½) + mean x              (:34-37)
  translation  shift by an integer in [−S, S], S = int(H·0.125 + 0.5) (rows; W for columns), 0 fill (:40-53)
  resize       bilinear to s = int(r·W), r uniform in [0.8, 1.2), then zero-pad (s < W) or centre-crop
               back to W (:55-77)
  cutout       zero an (int(H·½ + ½) × int(W·½ + ½)) box centred anywhere, clipped at the borders (:80-94)

applied in the policy's order (DiffAugment iterates ``policy.split(',')``, :14-16; the zoo's CLIP energy
uses 'color,translation,resize,cutout', model/energy/clip_guide.py:10). Every op is differentiable
w.r.t. the pixels (affine maps, gathers, masks), which is what lets a guidance energy average over them.

Randomness: the official code draws from torch's and numpy's global generators. Here an op takes its
uniforms ``u`` (one row of ``param_count(policy)`` numbers per image) and ``draw_params`` makes them
from per-sample integer keys, one CPU ``torch.Generator`` per key. Why keys and not one generator for
the batch: a shared generator hands a sample different augmentations depending on its position in the
batch and on which other samples share it, so its gradient and its final image would change with
``runtime.batch_size`` or the actor count; with keys (derived from the sample's seed and the Langevin
step) a sample's augmentations are its own, as its noise is (a pure function of its seed, never of its
batch: docs/maths.md, "Noise"). CPU generators also give the same numbers whatever device the
images are on (CUDA generators do not). The cost is a few numbers per sample per step. The official
resize draws ONE ratio per DiffAugment call (np.random.rand(), :56), and the CLIP energy calls
DiffAugment once per image on its replicas (clip_guide.py:45-51): so ``draw_params`` gives all views of
an image the ratio of its first view (``SHARED``), every other op a draw of each view's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# uniforms each op of a policy consumes, in order (brightness, saturation, contrast | rows, columns | ratio | rows, columns)
PARAMS = {"color": 3, "translation": 2, "resize": 1, "cutout": 2}
SHARED = {"resize"}  # one draw per image, shared by its views (np.random.rand() once per call, :56)
TRANSLATION_RATIO = 0.125  # rand_translation(x, ratio=0.125) (:40)
RESIZE_RANGE = (0.8, 1.2)  # rand_resize(x, min_ratio=0.8, max_ratio=1.2) (:55)
CUTOUT_RATIO = 0.5  # rand_cutout(x, ratio=0.5) (:80)


def param_count(policy: Sequence[str]) -> int:
    """Uniforms one augmentation of ``policy`` needs per image."""
    unknown = [p for p in policy if p not in PARAMS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; the ops are {', '.join(PARAMS)}")
    return sum(PARAMS[p] for p in policy)


def shared_columns(policy: Sequence[str]) -> list[int]:
    """The columns of a policy's uniforms that all views of one image share (the ``SHARED`` ops')."""
    cols, at = [], 0
    for op in policy:
        if op in SHARED:
            cols += range(at, at + PARAMS[op])
        at += PARAMS[op]
    return cols


def draw_params(keys: Sequence[int], count: int, policy: Sequence[str], device=None) -> torch.Tensor:
    """(B, count, P) uniforms in [0, 1): row b comes from ``keys[b]`` alone (one CPU generator per key);
    the ``SHARED`` ops' columns hold view 0's draw in every view of the image."""
    p = param_count(policy)
    rows = []
    for key in keys:
        g = torch.Generator().manual_seed(int(key) & (2**63 - 1))
        rows.append(torch.rand((count, p), generator=g))
    out = torch.stack(rows) if rows else torch.zeros((0, count, p))
    cols = shared_columns(policy)
    if cols and count:
        out[:, :, cols] = out[:, :1, cols]  # one resize ratio per DiffAugment call, i.e. per image (:56)
    return out.to(device) if device is not None else out


def diff_augment(x: torch.Tensor, policy: Sequence[str], u: torch.Tensor) -> torch.Tensor:
    """Augment images (N, C, H, W) in [0, 1] with ``policy`` and uniforms ``u`` (N, param_count);
    an empty policy returns ``x`` itself."""
    if not policy:
        return x
    if u.shape != (x.shape[0], param_count(policy)):
        raise ValueError(f"need uniforms of shape {(x.shape[0], param_count(policy))}, got {tuple(u.shape)}")
    u = u.to(x.device, torch.float32)  # float32 whatever x is: the integer sizes and shifts come from u
    at = 0
    for op in policy:
        n = PARAMS[op]
        x = _OPS[op](x, u[:, at:at + n])
        at += n
    return x


def color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness, saturation, contrast (DiffAugment_pytorch.py:23-37)."""
    b, s, c = (u[:, i].to(x.dtype).view(-1, 1, 1, 1) for i in range(3))
    x = x + (b - 0.5)  # brightness: ± ½, half the [0, 1] range (:24)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (s * 2) + mean_c  # saturation × [0, 2) around the grey of each pixel (:29-30)
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (c + 0.5) + mean  # contrast × [½, 3/2) around the image mean (:35-36)


def _randint(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """torch.randint(low, high) from uniforms in [0, 1): an integer in {low … high − 1}."""
    return (u * (high - low)).floor().long().clamp(max=high - low - 1) + low  # u < 1; the clamp guards rounding


def translation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Integer shift, uncovered pixels 0 (DiffAugment_pytorch.py:40-53: pad by one zero, clamp the index).

    out[i, j] = x[i + dy, j + dx] where inside, else 0; dy uniform on {−S … S}, S = int(H·0.125 + 0.5) (:41-42).
    """
    n, _, h, w = x.shape
    sh, sw = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)  # :41
    dy, dx = _randint(u[:, 0], -sh, sh + 1), _randint(u[:, 1], -sw, sw + 1)  # :42-43
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1) + 1).clamp(0, h + 1)  # (N, H) (:49)
    cols = (torch.arange(w, device=x.device).view(1, w) + dx.view(n, 1) + 1).clamp(0, w + 1)  # (N, W) (:50)
    padded = F.pad(x, [1, 1, 1, 1])  # the zero border every out-of-range index lands on (:51)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)  # (N,H,W,C) → NCHW


def resize_taps(ratio: torch.Tensor, size: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """One axis of ``rand_resize`` as a per-image linear map: for each output pixel j of an axis of
    ``size``, the two source pixels (i0, i1) and weights (w0, w1), each (N, size). Weights are 0 where
    the output is padding.

    s = int(r·size) (:57); output j reads pixel j + o of the resized axis, o = −int((size − s)/2) when
    padding (s < size, :61-66), +int((s − size)/2) when cropping (:68-72); the resized axis is
    F.interpolate(mode='bilinear', align_corners=False) (:57): source x = max((j' + ½)·size/s − ½, 0),
    i0 = ⌊x⌋, i1 = min(i0 + 1, size − 1), w1 = x − i0 (PyTorch's area_pixel_compute_source_index),
    x computed in ``dtype`` as PyTorch's kernel does for images of that dtype (float32, or float64).
    """
    s = torch.floor(ratio.double() * size).clamp(min=1)  # int(resize_ratio * x.shape[3]) (:57), float64 as Python
    offset = torch.where(s < size, -torch.div(size - s, 2, rounding_mode="floor"),  # left_pad (:62-63)
                         torch.div(s - size, 2, rounding_mode="floor"))  # left (:69-70)
    j = torch.arange(size, device=ratio.device, dtype=torch.float64).view(1, size) + offset.view(-1, 1)
    inside = (j >= 0) & (j < s.view(-1, 1))  # F.pad(..., "constant", 0.) outside (:66)
    scale = (size / s).to(dtype).view(-1, 1)  # PyTorch: (opmath) input_size / output_size
    src = ((j.to(dtype) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=size - 1)
    w1 = (src - i0) * inside
    w0 = (1 - (src - i0)) * inside
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=size - 1), w0, w1


def resize(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Bilinear resize by r = 0.8 + 0.4·u, zero-padded or centre-cropped back (DiffAugment_pytorch.py:55-77).

    Separable, as bilinear interpolation is: rows then columns, each two gathers per image, so every
    image of the batch has its own ratio in one batched op. The official resizes both axes to
    int(r·W) and asserts a square image (:57, :74-75); each axis here uses its own length (the same on a
    square image).
    """
    n, c, h, w = x.shape
    lo, hi = RESIZE_RANGE
    ratio = u[:, 0].double() * (hi - lo) + lo  # np.random.rand()*(max_ratio-min_ratio) + min_ratio (:56)
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    r0, r1, rw0, rw1 = resize_taps(ratio, h, opmath)
    c0, c1, cw0, cw1 = resize_taps(ratio, w, opmath)

    def rows(t, i, wt):  # out[:, :, j, :] = t[:, :, i[j], :]·wt[j]
        return t.gather(2, i.view(n, 1, h, 1).expand(n, c, h, t.shape[3])) * wt.to(t.dtype).view(n, 1, h, 1)

    def cols(t, i, wt):
        return t.gather(3, i.view(n, 1, 1, w).expand(n, c, t.shape[2], w)) * wt.to(t.dtype).view(n, 1, 1, w)

    x = rows(x, r0, rw0) + rows(x, r1, rw1)
    return cols(x, c0, cw0) + cols(x, c1, cw1)


def cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Zero an (int(H·½ + ½) × int(W·½ + ½)) box (DiffAugment_pytorch.py:80-94): its centre offset uniform on
    {0 … H − (size mod 2 == 1)}, rows offset − size//2 … offset − size//2 + size − 1 clipped to the image."""
    n, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)  # :81
    oy = _randint(u[:, 0], 0, h + (1 - ch % 2))  # randint(0, H + (1 − size % 2)) (:82)
    ox = _randint(u[:, 1], 0, w + (1 - cw % 2))  # (:83)
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    top, left = (oy - ch // 2).view(n, 1), (ox - cw // 2).view(n, 1)
    in_r = (r >= top) & (r < top + ch)  # (N, H); the official clamps the box's indices into the image (:89)
    in_c = (c >= left) & (c < left + cw)  # (N, W) (:90)
    mask = 1 - (in_r.view(n, h, 1) & in_c.view(n, 1, w)).to(x.dtype)  # (:91-93)
    return x * mask.unsqueeze(1)


_OPS = {"color": color, "translation": translation, "resize": resize, "cutout": cutout}


def augment(x: torch.Tensor, policy: Sequence[str], keys: Sequence[int], count: int) -> torch.Tensor:
    """``count`` augmentations of each image: (B, C, H, W) → (B·count, C, H, W), sample-major
    (rows b·count … b·count + count − 1 are image b's), augmentation l of image b from ``keys[b]``
    (the official ``DiffAugment(img.expand(replicate, …))`` of each image, clip_guide.py:45-51)."""
    if len(keys) != x.shape[0]:
        raise ValueError(f"got {len(keys)} augmentation keys for a batch of {x.shape[0]}")
    u = draw_params(keys, count, policy, x.device)
    reps = x.repeat_interleave(count, dim=0)
    return diff_augment(reps, policy, u.reshape(-1, u.shape[-1]))
