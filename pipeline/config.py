"""Typed job configuration: one YAML file per job, ``--set section.key=value`` overrides.

Every problem — an unknown key, a wrong type, a value out of range — is found before any
work starts and reported as one line naming the key, the value and what is allowed.
Credentials never belong here: ``storage_options`` carries only non-secret settings.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipeline.data.filesystems import is_secret_name, secret_keys_in
from pipeline.errors import ConfigError

REDACTED = "<redacted>"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.2), as users expect."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class Section(BaseModel):
    # strict: "10" is not a number and "yes" is not a boolean; ints are accepted as floats.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class StorageOptions(Section):
    """Mixin check: ``storage_options`` may never hold credentials."""

    @field_validator("storage_options", check_fields=False)
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        secret = secret_keys_in(v)
        if secret:
            raise ValueError(
                f"{secret[0]} looks like a credential; credentials must come from the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, IRSA or a Kubernetes secret), never from a config"
            )
        return v


class InputConfig(StorageOptions):
    uri: str | list[str] | None = None  # prefix, brace pattern or list; s3://, gs://, file://, path
    storage_options: dict[str, Any] = Field(default_factory=dict)  # non-secret fsspec options, e.g. endpoint_url
    # metadata member extensions carried through unchanged (exact, lowercase; "seg.json" for
    # k.seg.json); every other non-image member is dropped with a "dropped member" reject row
    carry: list[str] = Field(default_factory=lambda: ["json", "txt", "cls"])

    @field_validator("carry")
    @classmethod
    def _carry_extensions(cls, v: list[str]) -> list[str]:
        from pipeline.data.images import IMAGE_EXTENSIONS

        for ext in v:
            if ext != ext.lower():
                raise ValueError(f"{ext!r} must be lowercase ({ext.lower()!r}): tar member extensions are compared lowercased")
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", ext):
                raise ValueError(f"{ext!r} is not an extension: letters, digits, '_', '-' in dot-separated parts, "
                                 "without the leading dot, e.g. 'json' or 'seg.json'")
            if ext in IMAGE_EXTENSIONS or ext == "latentshift.json":
                raise ValueError(f"{ext!r} cannot be carried: it is an image extension or the provenance member, "
                                 "which every output sample writes itself")
        if len(set(v)) != len(v):
            raise ValueError(f"{sorted(e for e in set(v) if v.count(e) > 1)} listed twice")
        return v


class OutputConfig(StorageOptions):
    uri: str | None = None  # prefix for images/, latents/, scores/, _ledger/, _rejects/, stats/, report/, eval/
    storage_options: dict[str, Any] = Field(default_factory=dict)  # non-secret fsspec options, e.g. endpoint_url
    latents: Literal["full", "start", "none"] = "full"  # full: x_start and every noise; start: x_start only; none
    image_format: Literal["png", "jpg", "webp"] = "png"  # the output images' format (jpg and webp at quality 95)
    latent_dtype: Literal["float16", "float32"] = "float16"  # the stored latents' dtype
    # how long a run's shard claims outlive its last heartbeat (renewed every quarter of this):
    # a run killed on another machine frees its shards after this long (pipeline/data/claims.py)
    lease_seconds: float = Field(300.0, ge=4, le=86400)
    # translate, edit, search, guide and ood sample also write the browsable gallery (`latentshift
    # gallery`, the `gallery` section) of the output at the end of each run: pages of shards done since
    gallery: bool = False


class ModelConfig(StorageOptions):
    model: str | None = None  # diffusers folder (local, s3://, gs://) or hub id
    condition: int | str | None = None  # class index or prompt
    # classifier-free guidance w: ε_u + w(ε_c − ε_u); 1 = the conditional ε alone
    guidance_scale: float = Field(1.0, ge=0)
    null_class: int | None = Field(None, ge=0)  # class models: the unconditional class for CFG
    allow_pickle: bool = False  # load pickle-based weights (.bin/.ckpt): only for files you trust
    # non-secret fsspec options for an s3:// or gs:// model
    storage_options: dict[str, Any] = Field(default_factory=dict)


class SamplerConfig(Section):
    method: Literal["dpm", "ddim"] = "dpm"  # dpm: the stochastic DPM-Encoder; ddim: deterministic inversion
    steps: int = Field(100, ge=1, le=10000)  # size of the scheduler's set_timesteps grid
    eta: float = Field(0.1, ge=0)  # η of the DPM-Encoder and its decoder (> 0 for dpm)
    strength: float = Field(0.8, gt=0, le=1)  # keeps the last ⌊strength·steps⌋ steps of the grid (at least one)
    refine_steps: int = Field(0, ge=0, le=10000)  # re-noise to t = refine_steps − 1, denoise every t below (η = 1)
    seed: int = Field(0, ge=0)  # a sample's noise depends only on (seed, shard/key)
    # x̂0 clipping: auto = as the model's scheduler config says (clip_sample / thresholding),
    # off = never (the official CycleDiffusion and DiscoveryDiff code), on = clamp to ±1
    clip_x0: Literal["auto", "on", "off"] = "auto"

    @field_validator("eta")
    @classmethod
    def _eta_for_method(cls, v: float, info: ValidationInfo) -> float:
        if info.data.get("method") == "dpm" and v == 0:
            raise ValueError("the dpm encoder is stochastic and needs eta > 0 (use method: ddim for eta = 0)")
        return v


class ImageConfig(Section):
    size: int = Field(256, ge=8, le=4096)  # inputs are decoded to size × size (see resize)
    resize: Literal["center_crop", "stretch"] = "center_crop"  # short side to size, then crop
    max_pixels: int = Field(50_000_000, ge=1)  # larger images are rejected, not decoded
    exif_transpose: bool = True  # apply the EXIF orientation tag (false: pixels as stored)


class RuntimeConfig(Section):
    batch_size: int = Field(16, ge=1)  # rows per Ray batch; on a GPU a batch that does not fit runs in halves
    actors: int | list[int] = 1  # n, or [min, max] for an autoscaling pool
    # auto: $LATENTSHIFT_GPUS_PER_ACTOR if set, else 1 when the cluster has GPUs at job start, else 0
    gpus_per_actor: Literal["auto"] | float = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on GPU, float32 on CPU
    # torch.compile of the UNet on GPU actors (ignored on CPU): "default", or "reduce-overhead" (CUDA
    # graphs too). Compiling takes about a minute per actor, repaid on long runs; see docs/performance.md.
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    # where model stages run. actors: a fixed pool (runtime.actors), models loaded once per actor, which
    # lives for one run. tasks: Ray tasks (at most runtime.actors at a time) whose worker process keeps the
    # stage for its next batch, and keeps torch and diffusers imported for the next run: no actor start
    # (process, imports, model load: 5-8 s on a small CPU) per run. auto: tasks on a one-node Ray with
    # no GPU per actor (a laptop, CI, the demo), actors otherwise (a cluster, any GPU)
    pool: Literal["auto", "actors", "tasks"] = "auto"

    @field_validator("actors")
    @classmethod
    def _actors(cls, v):
        if isinstance(v, int):
            if v < 1:
                raise ValueError("must be >= 1, or [min, max] with 1 <= min <= max")
            return v
        if len(v) != 2 or not 1 <= v[0] <= v[1]:
            raise ValueError("must be n >= 1, or [min, max] with 1 <= min <= max")
        return v

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be 'auto' or a number >= 0")
        return v


class OODConfig(Section):
    # the timestep the OOD images are inverted to and the Gaussian is fitted at (snapped to the grid)
    t0: int = Field(500, ge=1)
    inversion_steps: int = Field(40, ge=1)  # DDIM steps of the inversion to t0
    # isotropic: the mean of per-dimension variances; scalar: np.var over every entry, the official
    # estimator (DiscoveryDiff discovery.py:509), which adds the spread of the per-dimension means,
    # so Gaussian draws land further out than the data (tolerance selection then keeps none:
    # use it with slerp candidates, as the official code); diagonal: one per dimension
    variance: Literal["isotropic", "scalar", "diagonal"] = "isotropic"
    stats: str | None = None  # the statistics file (null: <output.uri>/stats/ood.safetensors)
    count: int = Field(1000, ge=1)  # ood sample: images to make
    # candidates: gaussian = μ + σ·n; slerp = the official slerp of a real inverted latent toward
    # such a draw, at slerp_weight (None: the largest k/21 whose probe candidates pass the
    # selection at slerp_target_rate)
    candidates: Literal["gaussian", "slerp"] = "gaussian"
    # the Gaussian draw's share in slerp candidates; null: the largest official k/21 passing at slerp_target_rate
    slerp_weight: float | None = Field(None, gt=0, le=1)
    slerp_target_rate: float = Field(0.5, gt=0, le=1)  # the acceptance rate slerp_weight = null aims for
    optimise_steps: int = Field(0, ge=0, le=1000)  # gradient steps toward the measured geometry, before selection
    optimise_lr: float = Field(0.25, gt=0)  # step size of optimise_steps, on latents scaled by the measured distance
    geometric: bool = True  # select candidates by their geometry against the reservoir
    # tolerance: within tolerance × the data's spread of its mean geometry; window: the official
    # windows on the mean distance and angles to 10 random references
    selection: Literal["tolerance", "window"] = "tolerance"
    tolerance: float = Field(2.0, gt=0)  # selection tolerance: each statistic within this × the data's spread
    # official: 0.05 % on distance, 0.1° on angles (sized for 3·256² latents); calibrated: as wide
    # as lets window_coverage of the reservoir's own latents pass each statistic
    window: Literal["official", "calibrated"] = "calibrated"
    # window calibrated: the share of the reservoir's own latents each window lets pass
    window_coverage: float = Field(0.9, gt=0, le=1)
    reservoir: int = Field(256, ge=3, le=65536)  # inverted latents kept for geometry (bounded)
    shard_size: int = Field(256, ge=1)  # synthesized samples per output shard


class ClipConfig(StorageOptions):
    """An open_clip model from a local or s3:// checkpoint; nothing is ever downloaded at run time."""

    model: str = "ViT-B-16"  # open_clip name, or a model-config JSON path (official: ViT-B/16, Asyrp main.py:212)
    pretrained: str | None = None  # checkpoint file: local path or s3://, gs:// (safetensors)
    allow_pickle: bool = False  # load a .pt/.bin checkpoint: only for files you trust
    # antialias the resize to CLIP's input size. The official CycleDiffusion, zoo and Asyrp numbers
    # came from torchvision < 0.17, whose Resize did not antialias tensors (cycle-diffusion
    # model/energy/clean_clip.py:14-17 keeps CLIP's Resize for tensors): false reproduces them
    antialias: bool = True
    # non-secret fsspec options for an s3:// or gs:// checkpoint
    storage_options: dict[str, Any] = Field(default_factory=dict)


class HSpaceTrainConfig(Section):
    """Training a learned direction f_t (``hspace.method: learned``); defaults: the official
    script_train.sh and main.py of kwonminki/Asyrp_official."""

    loss: Literal["clip", "color"] = "clip"  # clip: directional CLIP (needs clip.pretrained); color: toward target_color
    target_color: list[float] = Field(default_factory=lambda: [1.0, 0.0, 0.0])  # loss color: RGB in [0, 1]
    templates: bool = True  # CLIP text features averaged over the official ImageNet prompt templates
    images: int = Field(100, ge=1)  # script_train.sh --n_train_img 100: the first N of input.uri, by shard and key
    iterations: int = Field(5, ge=1)  # --n_iter 5
    batch_size: int = Field(1, ge=1)  # --bs_train 1
    lr: float = Field(0.5, gt=0)  # --lr_training 0.5 (SGD)
    lr_step: int = Field(3, ge=1)  # StepLR step_size (main.py:218)
    lr_gamma: float = Field(0.1, gt=0)  # StepLR gamma (main.py:219)
    attribute_weight: float = Field(1.0, ge=0)  # --clip_loss_w 1.0
    l1_weight: float = Field(3.0, ge=0)  # --l1_loss_w 3.0


class HSpaceConfig(Section):
    """h-space editing (Asyrp): `direction fit` writes ``direction``, `edit` reads it."""

    direction: str | None = None  # direction file (safetensors + JSON header): local path or s3://…
    # non-secret fsspec options for the direction file
    direction_storage_options: dict[str, Any] = Field(default_factory=dict)
    # mean-difference: Δh_t = mean h_t over `examples` (set B) − over input.uri (set A), no training;
    # learned: a DeltaBlock f_t(h, t) trained on input.uri with `train`
    method: Literal["mean-difference", "learned"] = "mean-difference"
    examples: str | list[str] | None = None  # set B shards (mean-difference), read with input.storage_options
    t0: int = Field(999, ge=1)  # inversion target (official --t_0 999, main.py:159); snapped to the grid by `grid: schedule`
    steps: int = Field(40, ge=1)  # timesteps of the grid of inversion and edit (official --n_inv_step / --n_test_step 40, main.py:160-162)
    # schedule: the model scheduler's set_timesteps grid from t0 (snapped: 999 → 975 for 40 steps);
    # linspace: the official int(s + 1e-6) for s in linspace(0, 1, steps)·t0, t0 … 0 with t0 itself, the last
    # step to ᾱ = 1 (diffusion_latent.py:154-156, 570-574; utils/diffusion_utils.py:68-69)
    grid: Literal["schedule", "linspace"] = "schedule"
    # which ε an inversion step t_p → t takes: upper = ε_θ(x_p, t) (this project's DDIM inversion); lower =
    # ε_θ(x_p, p), starting from x0 at the grid's lowest t (official precompute_pairs, diffusion_latent.py:1034-1044)
    inversion_eps: Literal["upper", "lower"] = "upper"
    # fit: an int, "auto" (LPIPS curves the fit measures, needs `lpips`) or null = the official fixed values
    # (500, 200 in script_train.sh); edit: an int overrides, "auto" = from the direction file's LPIPS curves
    # with this config's thresholds, null = the direction file's own
    t_edit: int | Literal["auto"] | None = None
    t_boost: int | Literal["auto"] | None = None  # as t_edit, for the boost (quality) interval's start
    lpips: str | None = None  # LPIPS network file (written by `latentshift lpips-export`): a fit with it records the curves
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"  # the LPIPS backbone of hspace.lpips
    lpips_edit_threshold: float = Field(0.33, gt=0)  # t_edit: LPIPS(x0, x̂0_t) ≥ this · cos(texts) (main.py:21)
    # t_boost's curve: x_t = LPIPS(x0, x_t) (official --add_noise_from_xt, script_inference.sh:34), or
    # x0_hat = LPIPS(x0, x̂0_t) (main.py without the flag, diffusion_latent.py:1386-1405)
    boost_curve: Literal["x_t", "x0_hat"] = "x_t"
    # t_boost: the first t whose boost_curve reaches this; null = the official pairing, 1.2 on x_t
    # (script_inference.sh:35 --lpips_addnoise_th 1.2), 0.1 on x0_hat (main.py:22's default)
    lpips_boost_threshold: float | None = Field(None, gt=0)
    source_text: str | None = None  # learned with CLIP, and the cosine that scales the t_edit threshold
    target_text: str | None = None  # … and the target's
    scales: list[float] = Field(default_factory=lambda: [1.0])  # edit strengths: one output image per scale
    train: HSpaceTrainConfig = Field(default_factory=HSpaceTrainConfig)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: str, info: ValidationInfo) -> str:
        if v == "linspace" and info.data.get("steps", 2) < 2:
            raise ValueError("grid: linspace needs steps >= 2 (it holds t0 and 0)")
        return v

    @property
    def boost_threshold(self) -> float:
        """lpips_boost_threshold, or the official one for boost_curve (1.2 on x_t, 0.1 on x0_hat)."""
        if self.lpips_boost_threshold is not None:
            return self.lpips_boost_threshold
        return {"x_t": 1.2, "x0_hat": 0.1}[self.boost_curve]

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one scale, e.g. [1.0]")
        return v

    @field_validator("direction_storage_options")
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        return StorageOptions._no_secrets(v)


class ScoreConfig(Section):
    """CLIP scores with the ``clip`` section's model: `latentshift score`, inline in translate, and the
    ranking of the zero-shot search. CLIP score = cos(image, target text); directional CLIP = cos(
    normalise(E(output) − E(input)), normalise(T(target) − T(source))) (cycle-diffusion
    model/energy/clean_clip.py:19-41)."""

    source_text: str | None = None  # the text of the input images (null: source.condition when it is a prompt)
    target_text: str | None = None  # the text of the outputs (null: target.condition when it is a prompt)
    templates: bool = False  # average text features over the ImageNet templates (official ranking: plain text)
    inline: bool = False  # translate: score every output as it is made (scores/<shard>.parquet)


class SearchConfig(Section):
    """The official zero-shot protocol (CycleDiffusion, best-of-N): per input, every (trial, encoder
    scale, skip) is DPM-encoded once and decoded at every decoder scale; the candidate with the highest
    directional CLIP is kept. Defaults: cycle-diffusion config/experiments/
    translate_text2img256_stable_diffusion_stochastic_1.cfg:9-13. The official grid is its
    ``custom_steps = 99`` (line 7): ``sampler.steps: 99`` on SD's scheduler walks 981, 971, …, 1, the
    vendored LDM ``make_ddim_timesteps`` grid (configs/paper/sd-zero-shot-search.yaml sets it); the
    default ``sampler.steps`` 100 walks 991 … 1, one grid step noisier at every skip."""

    trials: int = Field(15, ge=1)  # n_trials = 15 (line 12): fresh encoder noise per trial
    skips: list[int] = Field(default_factory=lambda: [15, 20, 25, 30, 40, 50])  # skip_steps (line 13): the walk starts at grid[skip]
    encoder_scales: list[float] = Field(default_factory=lambda: [1.0])  # encoder_unconditional_guidance_scales (line 10)
    decoder_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 5.0])  # decoder_… (line 11)
    top_k: int = Field(1, ge=1)  # outputs kept per input: the best at the image member, the others as top2… members
    stop_score: float | None = Field(None, ge=-1, le=1)  # early stop: an input whose best reaches this tries no more trials
    trials_per_walk: int = Field(0, ge=0)  # trials walked together per input (0: all); bounds the rows per UNet call
    # score candidates on the decoded image clamped to [-1, 1], as it is written (true), or on the
    # decoder's raw output (false: the official ranking post-processes to [0, 1] without a clamp,
    # stable_diffusion_stochastic_text_wrapper.py:216-228, and the official evaluation scores before
    # its clamp, evaluation/translate_text.py:65-77). Written images are clamped either way.
    clamp: bool = True

    @field_validator("skips", "encoder_scales", "decoder_scales")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("give at least one value")
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: a value is listed twice")
        return v

    @field_validator("skips")
    @classmethod
    def _skips(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v):
            raise ValueError("skips are counts of grid steps left out at the noisy end: each >= 0")
        return v


class GuideConfig(Section):
    """Guidance in latent space (CycleDiffusion paper, section on guidance): Langevin dynamics on the
    latent z of ``source.model``, z ← z − (s/2)∇(½‖z‖² + λ·E(G(z)|c)) + √s·n, G the decoder from pure
    noise: ``sampler.method: dpm`` (η = ``sampler.eta`` > 0) the stochastic walk of z = (x_T, ε…), or
    ``method: ddim`` with ``eta: 0`` the deterministic walk of z = x_T (the official LDM runs). Defaults
    of the CLIP energy: ChenWu98/unified-generative-zoo (config/experiments/
    clip_a_baby_ffhq256_latentdiff_10step_langevin_300.cfg, model/energy/clip_guide.py)."""

    count: int = Field(64, ge=1)  # images to make (output shards guided-NNNNN)
    shard_size: int = Field(256, ge=1)  # images per output shard guided-NNNNN
    energy: Literal["clip", "color", "hue"] = "clip"  # clip: needs clip.pretrained and text; color/hue: offline
    text: str | None = None  # energy clip: the prompt c
    target_color: list[float] = Field(default_factory=lambda: [1.0, 0.0, 0.0])  # energy color: RGB in [0, 1]
    target_hue: float = Field(0.0, ge=0, lt=360)  # energy hue: degrees
    # λ; null: 300 for clip (…_langevin_300.cfg:19; its siblings 100-1000), 100 for color/hue (the demo's)
    weight: float | None = Field(None, ge=0, validate_default=True)
    step_size: float = Field(0.05, gt=0)  # s (the paper and …_300.cfg:3: 0.05)
    langevin_steps: int = Field(200, ge=0)  # the paper and …_300.cfg:4: 200
    # G's grid inside the chain (official custom_steps_train, …_300.cfg:10: 10); the output is decoded on
    # sampler.steps (custom_steps, :9: 500). null: sampler.steps. Another length needs method ddim
    chain_steps: int | None = Field(None, ge=1, le=10000)
    augmentations: int = Field(50, ge=0)  # CLIP views averaged per image (clip_guide.py:18 replicate = 50; 0: none)
    augment: list[Literal["color", "translation", "resize", "cutout"]] = Field(
        default_factory=lambda: ["color", "translation", "resize", "cutout"])  # DiffAugment policy (clip_guide.py:10)
    # the energy on G(z) clamped to [-1, 1]; null: false for clip (the official post_process does not
    # clamp, latentdiff_wrapper.py:200-202), true for color/hue (as the demo's figures were measured)
    clamp: bool | None = Field(None, validate_default=True)
    checkpoint: bool = True  # recompute each decoder step in the backward pass (memory ~ one step, not K)

    @field_validator("weight")
    @classmethod
    def _default_weight(cls, v: float | None, info: ValidationInfo) -> float:
        if v is not None:
            return v
        return 300.0 if info.data.get("energy", "clip") == "clip" else 100.0

    @field_validator("clamp")
    @classmethod
    def _default_clamp(cls, v: bool | None, info: ValidationInfo) -> bool:
        return v if v is not None else info.data.get("energy", "clip") != "clip"


class EvalConfig(Section):
    """FID and KID of a run's images against a reference set (`latentshift eval`), as clean-fid computes
    them in its default clean mode, the mode of the official evaluation (cycle-diffusion
    evaluation/translate_to_dog.py:81-88 calls ``compute_kid`` / ``compute_fid`` with their defaults)."""

    reference: str | list[str] | None = None  # image shards, or a folder/prefix of image files (local, s3://, gs://)
    # non-secret fsspec options for eval.reference
    reference_storage_options: dict[str, Any] = Field(default_factory=dict)
    # the reference images resized (short side, centre crop) before their features, as the official
    # evaluation resizes AFHQ's 512² validation dogs to 256 with bilinear filtering (translate_to_dog.py:20-23,
    # 51-57; preprocess/afhqwild256.py:13); null: as stored
    reference_size: int | None = Field(None, ge=8, le=4096)
    reference_filter: Literal["bilinear", "bicubic"] = "bilinear"  # the filter of reference_size's resize
    images: str | list[str] | None = None  # the images judged: image shards or files (null: output.uri's committed images/)
    inception: str | None = None  # the feature network file (`latentshift fid-export PATH`): local, s3://, gs://
    # non-secret fsspec options for eval.inception
    inception_storage_options: dict[str, Any] = Field(default_factory=dict)
    name: str = Field("fid", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the result file: <output>/eval/<name>.json
    kid_subsets: int = Field(100, ge=1)  # cleanfid/fid.py kernel_distance(num_subsets=100)
    kid_subset_size: int = Field(1000, ge=2)  # … max_subset_size=1000
    seed: int = Field(0, ge=0)  # the KID subsets' draws (numpy RandomState, as clean-fid's global np.random)
    files_per_unit: int = Field(1000, ge=1)  # a folder of image files is read in units of this many files

    @field_validator("reference_storage_options", "inception_storage_options")
    @classmethod
    def _no_secrets(cls, v: dict) -> dict:
        return StorageOptions._no_secrets(v)


class GalleryConfig(Section):
    """`latentshift gallery`: static HTML pages of a run's output under ``<output.uri>/gallery/`` (docs/gallery.md).
    A page's weight is bounded by ``page_size``, not by the shard: a 10 000-sample shard is 100 light pages."""

    page_size: int = Field(100, ge=1, le=5000)  # samples per page (each with its input, output and further images)
    thumb_size: int = Field(256, ge=16, le=2048)  # a thumbnail's longest side in pixels (never enlarged): WebP files
    thumb_quality: int = Field(80, ge=1, le=100)  # their WebP quality (80: about 10 kB for 256²)


class JobConfig(Section):
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    source: ModelConfig = Field(default_factory=ModelConfig)
    target: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    ood: OODConfig = Field(default_factory=OODConfig)
    hspace: HSpaceConfig = Field(default_factory=HSpaceConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    guide: GuideConfig = Field(default_factory=GuideConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)

    def require(self, *keys: str) -> None:
        """Fail with one line if a key a command needs is unset, e.g. ``require("target.model")``."""
        for key in keys:
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part)
            if value in (None, "", []):
                raise ConfigError(f"config error: {key} is not set; this command needs it")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Stable hash of the resolved config (recorded in ledgers and provenance)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---- loading ------------------------------------------------------------------------


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"config error: --set {assignment!r}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if len(parts) < 2 or any(not p for p in parts):
        raise ConfigError(f"config error: --set {assignment!r}: expected section.key=value")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config error: --set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _model_class(annotation: Any) -> type[BaseModel] | None:
    try:
        return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    except TypeError:  # generic aliases such as dict[str, Any]
        return None


def _describe(err: dict, model: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, one-line message) for one pydantic error."""
    loc = tuple(err["loc"])
    # drop union-branch tags such as ('condition', 'int') so the key is what the user wrote
    fields: list[str] = []
    node: Any = model
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            fields.append(str(part))
            node = _model_class(node.model_fields[part].annotation)
        elif node is None and isinstance(part, str) and fields and fields[-1] == "storage_options":
            fields.append(part)
        else:
            break
    if err["type"] == "extra_forbidden":
        fields = [str(p) for p in loc]
    key = ".".join(fields) or ".".join(str(p) for p in loc)
    value = err.get("input")
    shown = REDACTED if "storage_options" in key or any(is_secret_name(p) for p in loc) else json.dumps(value, default=str)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent: Any = model
        for part in loc[:-1]:
            parent = _model_class(parent.model_fields[part].annotation) if parent and part in parent.model_fields else None
        allowed = ", ".join(parent.model_fields) if parent else ""
        what = "section" if len(loc) == 1 else "key"
        msg = f"unknown {what}" + (f"; allowed: {allowed}" if allowed else "")
    if err["type"] == "model_type" and isinstance(value, (str, int, float, list)):
        msg = "expected a mapping of keys (a section), not a value"
    return key, f"{key} = {shown}: {msg}"


def validate(data: Any, source: str = "config") -> JobConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines: dict[str, str] = {}
        for err in exc.errors():
            key, line = _describe(err, JobConfig)
            if key in lines:  # several union branches failed: list what each would accept
                extra = line.split(": ", 1)[1].removeprefix("Input should be ")
                lines[key] = f"{lines[key]} or {extra}"
                continue
            lines[key] = line
        raise ConfigError("config error: " + "\nconfig error: ".join(lines.values())) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> JobConfig:
    """Read a YAML config (or start empty), apply overrides, validate. Raises ConfigError."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: {path}: no such file")
        try:
            data = parse_yaml(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config error: {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {path}: expected a mapping of sections, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data, str(path or "config"))
