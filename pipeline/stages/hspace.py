"""h-space stages (actor pools): fit a direction's statistics, and edit images (Asyrp, seed 001).

``DirectionFitStage``: images → DDIM latents at t0 → the reverse walk's h at each timestep → one
PARTIAL row per batch for the driver (sums of h per timestep, LPIPS curves when ``hspace.lpips`` is
set, or the inverted latents a learned direction trains on). ``EditStage``: images → DDIM latents →
the asymmetric reverse process with Δh at each requested scale → one output sample per input
with one image per scale.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import HSpaceConfig, ModelConfig, OutputConfig
from pipeline.data.rows import RowBuffer, RowKind
from pipeline.diffusion import Latent, ddim_invert_model_space
from pipeline.diffusion.hspace import (
    DeltaBlock,
    EditSchedule,
    TableDirection,
    edit_walk,
    first_timestep_reaching,
    grid_schedule,
    hspace_grid,
    trace_h,
)
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.stages.base import (
    DIRECTION_FIX,
    LPIPS_FIX,
    LatentMaps,
    ModelStage,
    Work,
    load_clip_section,
    load_model,
    loading,
)
from pipeline.stages.tensors import to_model_range, to_uint8_tensor

FIXED_T_EDIT, FIXED_T_BOOST = 500, 200  # script_train.sh --user_defined_t_edit 500 --user_defined_t_addnoise 200
TRAIN_DTYPE = "float32"  # the official run_training has no half precision; float16 gradients underflow (see guide.py)


def load_lpips_file(hspace: HSpaceConfig, device):
    """The LPIPS network ``hspace.lpips`` names (local or remote file), on ``device``."""
    from pipeline.data.model_cache import materialize_file
    from pipeline.metrics.lpips_net import load_lpips

    if not hspace.lpips:
        raise ConfigError("config error: hspace.t_edit / t_boost = auto needs hspace.lpips (an LPIPS network file; "
                          "write one once with `latentshift lpips-export PATH`), or give t_edit and t_boost as numbers")
    with loading("hspace.lpips", hspace.lpips, LPIPS_FIX):
        path = materialize_file(hspace.lpips, hspace.direction_storage_options)
        return load_lpips(str(path), hspace.lpips_net, device)


def walk_grid(den, hspace: HSpaceConfig) -> list[int]:
    """``hspace.grid`` on ``den``: sets the ᾱ its last step ends at (``grid_schedule``) and returns the grid."""
    den.schedule = grid_schedule(den.schedule, hspace.grid)
    return hspace_grid(den.schedule, hspace.t0, hspace.steps, hspace.grid)


# ---- t_edit / t_boost from LPIPS curves -----------------------------------------------------

CURVE_LABELS = {"x0_hat": "LPIPS(x0, x̂0_t)", "x_t": "LPIPS(x0, x_t)"}


def auto_time(hspace: HSpaceConfig, curves: dict, which: str) -> int:
    """t_edit (``which="t_edit"``) or t_boost from LPIPS curves {timesteps, x0_hat, x_t, text_cosine}: the
    first t, scanning up, whose curve reaches the threshold (official set_t_edit_t_addnoise,
    diffusion_latent.py:1331-1406): t_edit on x̂0 at lpips_edit_threshold · cos(texts) (:1334, :1373-1376);
    t_boost on ``boost_curve`` at ``boost_threshold`` (:1386-1405).

    A threshold the curve never reaches is an error naming the setting, not the top of the grid: the
    official code stops there too (t_addnoise unbound), and the top of the grid would boost (η = 1) the
    whole walk or apply Δh at t0 alone, an edit unlike the one the thresholds describe, with no sign why."""
    if which == "t_edit":
        cosine = curves.get("text_cosine")
        factor = 1.0 if cosine is None else float(cosine)
        name, setting, value = "x0_hat", "hspace.lpips_edit_threshold", hspace.lpips_edit_threshold
    else:
        factor, name, setting, value = 1.0, hspace.boost_curve, "hspace.lpips_boost_threshold", hspace.boost_threshold
    values, timesteps = curves[name], curves["timesteps"]
    t = first_timestep_reaching(timesteps, values, value * factor)
    if t is not None:
        return t
    top = max(range(len(values)), key=lambda k: values[k])
    scaled = f" × cos(texts) {factor:.3f}" if factor != 1.0 else ""
    below = f" below {values[top] / factor:.3f}" if factor > 0 else ""
    raise ConfigError(f"config error: hspace.{which} = auto: {CURVE_LABELS[name]} never reaches {setting} {value:g}"
                      f"{scaled}; its maximum is {values[top]:.3f} at t = {timesteps[top]}. Set {setting}{below}, "
                      f"or hspace.{which} to a number")


def file_curves(hspace: HSpaceConfig, header: dict) -> dict:
    """The direction file's LPIPS curves, for an edit's t_edit / t_boost = auto."""
    curves = header.get("lpips_curves")
    if not curves:
        raise ConfigError(f"config error: hspace.t_edit / t_boost = auto in an edit reads the LPIPS curves of the "
                          f"direction file, and {hspace.direction} has none: fit it with hspace.lpips set, or give "
                          "t_edit and t_boost as numbers (null: the file's own)")
    return curves


def _pack(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    from pipeline.data.stats import tensors_to_bytes

    return tensors_to_bytes({k: v.detach().cpu().numpy() for k, v in tensors.items()}, meta)


class InvertingStage(ModelStage):
    """What both h-space stages start with: sample rows → DDIM latents at t0 on ``self.grid``."""

    concurrent_batches = 2
    source = source_cfg = grid = None
    seed = 0

    def prepare(self, batch: dict) -> Work:
        return self.image_work(batch, self.seed, self.source)

    def invert(self, work: Work):
        """(images in [-1, 1], x0 in model space, the DDIM latent) of a batch, on the device."""
        den, cond, w = self.source, self.source_cfg.condition, self.source_cfg.guidance_scale
        images = to_model_range(work.pixels.to(den.device))
        x0 = den.to_model_space(images)
        z = ddim_invert_model_space(den, x0, timesteps=self.grid, condition=cond, guidance_scale=w,
                                    eps_at=self.hspace.inversion_eps)
        z.seeds = list(work.seeds)
        return images, x0, z


class DirectionFitStage(InvertingStage):
    """Per batch, one PARTIAL row: ``count``, ``h_sum`` (K, C, h, w) and ``h_norm_sum`` (K,) for a mean
    difference; ``x_start`` and ``x0`` (model space) with the samples' ids for a learned direction;
    ``lpips_x0_sum`` / ``lpips_xt_sum`` (K,) when ``hspace.lpips`` is set."""

    def __init__(self, source: ModelConfig, hspace: HSpaceConfig, output: OutputConfig, clip_x0: str = "auto",
                 dtype: str = "auto", compile: str = "off"):
        super().__init__(output)
        self.source_cfg, self.hspace = source, hspace
        self.source = load_model(source, dtype, clip_x0, key="source")  # never compiled: h is read by a hook on the mid block
        self.grid = walk_grid(self.source, hspace)
        self.lpips = load_lpips_file(hspace, self.source.device) if hspace.lpips else None
        self.ready()

    def compute(self, work: Work):
        if work.pixels is None:
            return None
        den, cond, w = self.source, self.source_cfg.condition, self.source_cfg.guidance_scale
        images, x0, z = self.invert(work)
        out = {"count": torch.tensor([len(work.idx)], dtype=torch.int64)}
        if self.hspace.method == "learned":
            out.update(x_start=z.x_start.float(), x0=x0.float())
        if self.hspace.method == "learned" and self.lpips is None:
            return out, LatentMaps.of(z, self.output)  # training needs only x_T and x0: no reverse walk
        trace = trace_h(den, z.x_start, self.grid, cond, w, keep_states=self.lpips is not None)
        if self.hspace.method == "mean-difference":
            out.update(h_sum=trace.h.double().sum(0), h_norm_sum=trace.h.flatten(2).norm(dim=2).double().sum(0))
        if self.lpips is not None:  # official diffusion_latent.py:1260-1261: LPIPS(x0, x_t) and LPIPS(x0, x̂0_t)
            from pipeline.metrics.lpips_net import lpips_distance

            # on the raw x_t and x̂0, never clamped, as the official loss_fn_alex(x, x0) (a latent model's
            # decoder output unclamped alike): clamped, LPIPS(x0, x_t) stays under the official 1.2
            with torch.no_grad():
                d_x0 = [lpips_distance(self.lpips, images, den.to_pixels_with_grad(x)) for x in trace.x0_hat]
                d_xt = [lpips_distance(self.lpips, images, den.to_pixels_with_grad(x)) for x in trace.x_t]
            out.update(lpips_x0_sum=torch.stack(d_x0, 1).double().sum(0), lpips_xt_sum=torch.stack(d_xt, 1).double().sum(0))
        return out, LatentMaps.of(z, self.output)

    def emit(self, batch: dict, work: Work, result) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        if result is None:
            return rows.batch()
        tensors, maps = result
        idx = work.idx
        ids = [f"{batch['shard'][i]}/{batch['key'][i]}" for i in idx]
        rows.add(kind=RowKind.PARTIAL, partial=_pack(tensors, {"ids": ids, "timesteps": self.grid}))
        n_lat = self.add_latent_rows(rows, maps, batch, idx)
        rows.extend({"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx]},
                    kind=RowKind.SAMPLE, timesteps=self.grid, latent_rows=n_lat)
        return rows.batch()


# ---- editing -----------------------------------------------------------------------------


def direction_from_file(tensors: dict[str, np.ndarray], header: dict, den):
    """A direction file's contents as a Δh function on ``den``'s device; its h must fit the model's."""
    from pipeline.diffusion.hspace import h_channels, temb_channels

    channels, temb = h_channels(den.unet), temb_channels(den.unet)
    misfit = direction_misfit(tensors, header, channels, temb)
    if misfit:
        raise ModelLoadError(f"{misfit}, but {den.source!r} has {channels_of(header, channels, temb)}: "
                             f"{refit(header)} the direction on this model")
    if header["kind"] == "table":
        deltas = torch.from_numpy(np.asarray(tensors["deltas"], dtype=np.float32)).to(den.device)
        return TableDirection(list(header["timesteps"]), deltas)
    block = DeltaBlock(channels, temb, pre_norm="norm1.weight" in tensors)  # the ADM variant has a first norm
    block.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()})
    return block.to(den.device).eval().requires_grad_(False)


# ---- preflight of direction files (no model loaded: the UNet is built on the meta device) -------


def direction_misfit(tensors: dict[str, np.ndarray], header: dict, channels: int, temb: int) -> str | None:
    """What of a direction does not fit a model whose mid block has ``channels`` h channels and a timestep
    embedding of ``temb``; None when it fits (as ``direction_from_file`` will load it)."""
    fitted_on = header.get("model")
    if header["kind"] == "table":
        held = int(np.shape(tensors["deltas"])[1])
        return None if held == channels else f"the direction holds h of {held} channels (fitted on {fitted_on!r})"
    if (header.get("channels"), header.get("temb_channels")) == (channels, temb):
        return None
    return (f"the direction's DeltaBlock takes h of {header.get('channels')} channels and a timestep embedding of "
            f"{header.get('temb_channels')} (trained on {fitted_on!r})")


def channels_of(header: dict, channels: int, temb: int) -> str:
    return f"{channels}" if header["kind"] == "table" else f"{channels} and {temb}"


def refit(header: dict) -> str:
    return "fit" if header["kind"] == "table" else "train"


def mid_block_sizes(folder) -> tuple[int, int]:
    """(h channels, timestep-embedding width) of a resolved model folder's UNet mid block, from its config:
    the UNet is built on the meta device (no memory, no weights read)."""
    import diffusers

    from pipeline.diffusion.hspace import h_channels, temb_channels

    unet_dir = folder.path / "unet"
    cfg = diffusers.UNet2DModel.load_config(unet_dir)
    cls = getattr(diffusers, cfg.get("_class_name", "UNet2DModel"))
    with torch.device("meta"):
        unet = cls.from_config(cfg)
    return h_channels(unet), temb_channels(unet)


def preflight_grid(folder, hspace: HSpaceConfig) -> list[int]:
    """The timesteps an inversion / edit walks on a resolved model folder (``walk_grid``), from its
    scheduler config alone."""
    import diffusers

    from pipeline.diffusion.schedule import schedule_from_scheduler

    sched_dir = folder.path / "scheduler"
    cfg = diffusers.DDPMScheduler.load_config(sched_dir)
    cls = getattr(diffusers, cfg.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    schedule = grid_schedule(schedule_from_scheduler(cls.from_config(cfg)), hspace.grid)
    try:
        return hspace_grid(schedule, hspace.t0, hspace.steps, hspace.grid)
    except ValueError as exc:
        raise ConfigError(f"config error: hspace.t0: {exc}") from None


def check_direction_fits(tensors: dict[str, np.ndarray], header: dict, folder, hspace: HSpaceConfig) -> None:
    """Preflight of ``hspace.direction`` against the model ``source.model`` it will edit: one line naming the
    key, the file and the fix."""
    channels, temb = mid_block_sizes(folder)
    misfit = direction_misfit(tensors, header, channels, temb)
    if misfit:
        raise ConfigError(f"config error: hspace.direction {hspace.direction}: {misfit}, but source.model "
                          f"{folder.source!r} has {channels_of(header, channels, temb)}: {refit(header)} the direction "
                          f"on this model (`latentshift direction fit` with this source.model)")


def edit_schedule(hspace: HSpaceConfig, header: dict) -> EditSchedule:
    """t_edit / t_boost: the config's numbers; auto = from the direction file's LPIPS curves with this
    config's thresholds (as the official run_test derives them, diffusion_latent.py:552-554); null = the
    file's own. Δh scaled by fit grid / edit grid (diffusion_latent.py:626)."""

    def pick(which: str) -> int:
        value = getattr(hspace, which)
        if value == "auto":
            return auto_time(hspace, file_curves(hspace, header), which)
        return int(header[which]) if value is None else int(value)

    return EditSchedule(t_edit=pick("t_edit"), t_boost=pick("t_boost"), grid_scale=float(header["steps"]) / hspace.steps)


class EditStage(InvertingStage):
    """Images → DDIM latents at t0 → the asymmetric reverse process at each of ``hspace.scales``."""

    def __init__(self, source: ModelConfig, hspace: HSpaceConfig, output: OutputConfig, seed: int = 0,
                 clip_x0: str = "auto", dtype: str = "auto", compile: str = "off"):
        super().__init__(output)
        from pipeline.data.directions import read_direction

        self.source_cfg, self.hspace, self.seed = source, hspace, seed
        self.source = load_model(source, dtype, clip_x0, key="source")  # never compiled: Δh goes in through a hook
        with loading("hspace.direction", hspace.direction, DIRECTION_FIX):
            tensors, header = read_direction(hspace.direction, hspace.direction_storage_options)
            self.delta = direction_from_file(tensors, header, self.source)
            self.schedule = edit_schedule(hspace, header)
        self.grid = walk_grid(self.source, hspace)
        self.ready()

    def compute(self, work: Work):
        """(S, n, H, W, 3) uint8 images, scale-major, and the latent maps; a batch whose 2·S·n rows per
        UNet call do not fit on the device runs in pieces of samples (``ModelStage.fitting``)."""
        if work.pixels is None:
            return None
        parts = self.fitting(lambda lo, hi: self._edit(Work(work.idx[lo:hi], work.seeds[lo:hi], work.pixels[lo:hi])),
                             len(work.idx))
        z = Latent.cat([p[1] for p in parts])
        return np.concatenate([p[0] for p in parts], axis=1), LatentMaps.of(z, self.output)

    def _edit(self, work: Work) -> tuple[np.ndarray, Latent]:
        den, cond, w = self.source, self.source_cfg.condition, self.source_cfg.guidance_scale
        _, _, z = self.invert(work)
        x = edit_walk(den, z.x_start, self.grid, self.delta, self.hspace.scales, self.schedule, seeds=work.seeds,
                      condition=cond, guidance_scale=w)
        images = to_uint8_tensor(den.to_pixels(x)).cpu().numpy()  # (S·n, H, W, 3), scale-major
        return images.reshape(len(self.hspace.scales), len(work.idx), *images.shape[1:]), z

    def emit(self, batch: dict, work: Work, result) -> dict:
        rows = RowBuffer()
        self.pass_rejects(rows, batch)
        if result is None:
            return rows.batch()
        images, maps = result
        idx = work.idx
        n_lat = self.add_latent_rows(rows, maps, batch, idx)
        names = [f"scale{j}" for j in range(1, images.shape[0])]
        per_row = {"shard": batch["shard"][idx], "key": batch["key"][idx], "index": batch["index"][idx],
                   "member_names": batch["member_names"][idx], "member_data": batch["member_data"][idx],
                   "seed": np.asarray(work.seeds, dtype=np.int64), "pixels": list(images[0]),
                   "extra_names": [names] * len(idx), "extra_pixels": list(images[1:].swapaxes(0, 1))}
        rows.extend(per_row, kind=RowKind.SAMPLE, timesteps=self.grid, latent_rows=n_lat)
        return rows.batch()


# ---- training a learned direction (one Ray task) ------------------------------------------


def text_cosine(clip, hspace: HSpaceConfig) -> float:
    """cos(source text, target text) of the plain texts, no templates (official diffusion_latent.py:1321-1328):
    it weights the L1 term and scales the t_edit threshold."""
    a, b = clip.text_features([hspace.source_text]), clip.text_features([hspace.target_text])
    return float((a * b).sum())


def attribute_loss(den, hspace: HSpaceConfig, clip_cfg):
    """(loss(x̂0_edit, x0), factor of the L1 term, cos of the texts) for ``hspace.train.loss``.

    clip: −log((2 − L_dir)/2), L_dir = 1 − directional CLIP (official diffusion_latent.py:343), L1
    weighted by cos(source text, target text) (diffusion_latent.py:350). color: the mean colour of x̂0
    (in [0, 1]) pulled toward ``train.target_color``, squared distance; an offline loss for tests and demos.
    """
    train = hspace.train
    if train.loss == "color":
        target = torch.tensor(train.target_color, device=den.device).view(1, 3, 1, 1)

        def color(x0_edit, x0):
            rgb = (den.to_pixels_with_grad(x0_edit).clamp(-1, 1) + 1) / 2
            return (rgb.mean((2, 3), keepdim=True) - target).pow(2).sum(1).mean()

        return color, 1.0, None
    from pipeline.metrics.clip import IMAGENET_TEMPLATES, directional_similarity

    clip = load_clip_section(clip_cfg, den.device)
    templates = IMAGENET_TEMPLATES if train.templates else None
    # the text direction: template means of normalised features, not renormalised (losses/clip_loss.py:110-115)
    src_text = clip.text_features([hspace.source_text], templates, renormalize=False)
    trg_text = clip.text_features([hspace.target_text], templates, renormalize=False)
    cosine = text_cosine(clip, hspace)

    def directional(x0_edit, x0):
        with torch.no_grad():
            src = clip.image_features(den.to_pixels_with_grad(x0))
        edit = clip.image_features(den.to_pixels_with_grad(x0_edit))
        n = edit.shape[0]
        sim = directional_similarity(src, edit, src_text.expand(n, -1), trg_text.expand(n, -1))
        return -torch.log((2 - (1 - sim)) / 2).mean()

    return directional, cosine, cosine


def train_direction(source: ModelConfig, hspace: HSpaceConfig, clip_cfg, clip_x0: str, dtype: str,
                    x_start: np.ndarray, x0: np.ndarray, timesteps: list[int], t_edit: int):
    """Train a DeltaBlock on inverted latents (run as one Ray task): (state dict as numpy, log, cos of texts).

    ``dtype`` is runtime.dtype, what the actors infer in; the model trains in float32 whatever it says
    (TRAIN_DTYPE): the official code trains in float32, and float16 gradients underflow in the backward
    pass through the U-Net's decoder."""
    from pipeline.diffusion.hspace_train import TrainSettings, train_delta_block

    del dtype  # inference precision only, see above
    den = load_model(source, TRAIN_DTYPE, clip_x0, key="source")
    den.schedule = grid_schedule(den.schedule, hspace.grid)  # the ᾱ the fit's grid ends at; timesteps are that grid
    loss, l1_factor, cosine = attribute_loss(den, hspace, clip_cfg)
    t = hspace.train
    settings = TrainSettings(lr=t.lr, lr_step=t.lr_step, lr_gamma=t.lr_gamma, iterations=t.iterations,
                             batch_size=t.batch_size, attribute_weight=t.attribute_weight, l1_weight=t.l1_weight,
                             l1_factor=l1_factor)
    torch.manual_seed(0)  # the block's initial weights: the same inputs and settings give the same direction
    block = DeltaBlock.for_unet(den.unet)
    log = train_delta_block(den, block, torch.from_numpy(x_start), torch.from_numpy(x0), timesteps, t_edit, loss,
                            settings, condition=source.condition, guidance_scale=source.guidance_scale)
    return {k: v.detach().cpu().numpy() for k, v in block.state_dict().items()}, log, cosine
