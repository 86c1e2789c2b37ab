"""CLIP image and text features, and the directional CLIP loss, on open_clip, offline.

``load_clip(model, pretrained)`` builds an open_clip model from a built-in model name (e.g.
``ViT-B-16-quickgelu``) or a model-config JSON file, and loads its weights from a LOCAL file:
safetensors, or ``.pt``/``.pth``/``.bin`` only with ``allow_pickle=True``. Nothing is ever
downloaded: a download tag (``openai``, ``laion2b_…``) is refused as "no such file", as are
``hf-hub:``/``local-dir:`` names and models whose tokenizer or text tower open_clip would fetch from
the Hugging Face hub (``hf_tokenizer_name``/``hf_model_name`` configs, SigLIP names).

To make a checkpoint once, on a machine that is online: ``m = open_clip.create_model(name,
pretrained=tag)`` then ``safetensors.torch.save_file(m.state_dict(), "clip.safetensors")``. OpenAI
CLIP weights (what the official Asyrp code uses, ``clip.load('ViT-B/16')``, main.py:212) need the
``-quickgelu`` model names: open_clip's plain ``ViT-B-16`` uses GELU and only switches to QuickGELU
for the ``openai`` *tag*, which a file path does not carry.

The directional loss follows the official Asyrp code (kwonminki/Asyrp_official
losses/clip_loss.py, cited as clip_loss.py:LINE below), which DiffusionCLIP introduced:

    image direction  = normalise(E(edited) − E(source))      with E the normalised image features
    text direction   = normalise(T(target) − T(source))      T averaged over IMAGENET_TEMPLATES
    directional loss = 1 − cos(image direction, text direction)

Officially T is the mean over templates of *normalised* per-template features, NOT renormalised
(clip_loss.py:110-117 averages the per-template differences, which is the difference of the
unrenormalised means); pass ``text_features(..., renormalize=False)`` to match it exactly. The
default renormalises the mean (as clip_loss.py:142-147 does for its angle loss, and as zero-shot
classifiers do); the two directions differ only as far as the two means' norms differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError

# kwonminki/Asyrp_official utils/text_templates.py:1-81 (``imagenet_templates``), the default
# templates of CLIPLoss.get_text_features / compute_text_direction (clip_loss.py:90, :110-112).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_NO_DOWNLOAD = "latentshift never downloads at run time"
_MAKE_ONE = ("make one once, online: safetensors.torch.save_file(open_clip.create_model(MODEL, "
             "pretrained=TAG).state_dict(), PATH)")
_CONFIG_DIR: tempfile.TemporaryDirectory | None = None  # model configs registered from JSON files


class Clip(torch.nn.Module):
    """A frozen open_clip model (eval mode, no parameter gradients) with CLIP's preprocessing done on
    the device in torch, so image features stay differentiable w.r.t. the input pixels."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess_cfg: dict, name: str, antialias: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        size = preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode: str = preprocess_cfg.get("resize_mode", "shortest")
        self.interpolation: str = preprocess_cfg.get("interpolation", "bicubic")
        self.fill: float = preprocess_cfg.get("fill_color", 0) / 255.0
        # the resize to the model's input: antialiased (as PIL in CLIP's own preprocess) or not, as
        # torchvision < 0.17 resized tensors, which the official CycleDiffusion / Asyrp numbers came from
        self.antialias = bool(antialias)
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self._text_cache: dict[tuple, torch.Tensor] = {}
        self.train(False)

    def train(self, mode: bool = True) -> Clip:
        """Stays in eval mode: a frozen loss network (no dropout, whatever its owner does)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor, unit: bool = False) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] (``unit``: in [0, 1]) → the model's normalised input, on the model's
        device, in float32.

        As the official loss (clip_loss.py:39-41): [-1, 1] → [0, 1], then CLIP's Resize + CenterCrop
        (the shortest side to the model's size, bicubic; open_clip's ``resize_mode`` 'shortest'),
        then Normalize with the model's mean/std. Resizing is antialiased unless ``antialias`` is off
        (``clip.antialias``; see ``Clip.__init__``); values are not clamped, before or after the bicubic
        resize (the official tensor path clamps neither), so the gradient reaches every pixel.
        """
        x = images.to(self.device, torch.float32)
        x = x if unit else (x + 1) / 2
        x = self._resize(x)
        return (x - self.mean) / self.std

    def image_features(self, images: torch.Tensor, unit: bool = False) -> torch.Tensor:
        """L2-normalised image features (B, D), float32, differentiable w.r.t. ``images`` (in [-1, 1], or
        [0, 1] with ``unit``) (clip_loss.py:102-108 normalises them)."""
        feats = self.model.encode_image(self.preprocess(images, unit).to(self.dtype)).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def text_features(self, texts: Sequence[str], templates: Sequence[str] | None = None,
                      renormalize: bool = True) -> torch.Tensor:
        """L2-normalised text features (B, D), float32, cached per (text, templates, renormalize).

        With ``templates``: each text is put in every template (``t.format(text)``,
        clip_loss.py:167-168), each prompt's features are normalised (clip_loss.py:97-98), and their
        mean is taken; ``renormalize`` then normalises that mean (clip_loss.py:143-147). The
        official directional loss uses the mean as it is (``renormalize=False``, clip_loss.py:114).
        """
        if isinstance(texts, str):
            raise TypeError("text_features takes a list of strings")
        tkey = tuple(templates) if templates is not None else None
        keys = [(text, tkey, bool(renormalize) and tkey is not None) for text in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        if todo:
            with torch.no_grad():  # text is never differentiated (clip_loss.py:95 detaches it)
                if tkey is None:
                    for key, feat in zip(todo, self._encode_texts([k[0] for k in todo]), strict=True):
                        self._text_cache[key] = feat
                else:
                    for key in todo:
                        feats = self._encode_texts([t.format(key[0]) for t in tkey]).mean(0)
                        self._text_cache[key] = feats / feats.norm() if key[2] else feats
        return torch.stack([self._text_cache[k] for k in keys]).to(self.device)

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        feats = self.model.encode_text(tokens).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Resize + crop/pad as open_clip's ``image_transform`` (eval) does, for tensors."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if (h, w) == (th, tw):
            return x
        if self.resize_mode == "squash":
            return TF.resize(x, [th, tw], interpolation=mode, antialias=self.antialias)
        if self.resize_mode == "shortest" and th == tw:  # CLIP: Resize(n_px) + CenterCrop(n_px)
            x = TF.resize(x, th, interpolation=mode, antialias=self.antialias)
        else:  # open_clip ResizeKeepRatio (longest=1 for 'longest', 0 for 'shortest')
            rh, rw = h / th, w / tw
            ratio = max(rh, rw) if self.resize_mode == "longest" else min(rh, rw)
            x = TF.resize(x, [round(h / ratio), round(w / ratio)], interpolation=mode, antialias=self.antialias)
        return _center_crop_or_pad(x, th, tw, self.fill)


def _center_crop_or_pad(x: torch.Tensor, th: int, tw: int, fill: float) -> torch.Tensor:
    """torchvision's CenterCrop (top = round((h − th) / 2)), padding with ``fill`` where smaller
    (open_clip's CenterCropOrPad)."""
    h, w = x.shape[-2:]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
        h, w = x.shape[-2:]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[..., top:top + th, left:left + tw]


def image_direction(src_img_feat: torch.Tensor, edit_img_feat: torch.Tensor) -> torch.Tensor:
    """normalise(edit − source), with the official +1e-7 in the norm (clip_loss.py:178-179)."""
    d = edit_img_feat - src_img_feat
    return d / (d.norm(dim=-1, keepdim=True) + 1e-7)


def text_direction(src_text_feat: torch.Tensor, trg_text_feat: torch.Tensor) -> torch.Tensor:
    """normalise(target − source) (clip_loss.py:114-115; there the features are template means,
    line 114's mean of per-template differences)."""
    d = trg_text_feat - src_text_feat
    return d / d.norm(dim=-1, keepdim=True)


def directional_similarity(src_img_feat: torch.Tensor, edit_img_feat: torch.Tensor,
                           src_text_feat: torch.Tensor, trg_text_feat: torch.Tensor) -> torch.Tensor:
    """Per-sample cos(image direction, text direction), (B,); text features (D,), (1, D) or (B, D)
    broadcast. CosineSimilarity of the two normalised directions (clip_loss.py:20, :180)."""
    img = image_direction(src_img_feat, edit_img_feat)
    txt = text_direction(src_text_feat, trg_text_feat)
    return F.cosine_similarity(img, txt.expand_as(img), dim=-1)


def directional_loss(src_img_feat: torch.Tensor, edit_img_feat: torch.Tensor,
                     src_text_feat: torch.Tensor, trg_text_feat: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 − directional_similarity, (B,) (DirectionLoss 'cosine', clip_loss.py:24-26). The
    official loss is its batch mean (clip_loss.py:180); Asyrp trains on −log((2 − loss) / 2) of that
    mean (diffusion_latent.py:343)."""
    return 1 - directional_similarity(src_img_feat, edit_img_feat, src_text_feat, trg_text_feat)


def clip_score(img_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of image and text features, (B,); text (D,), (1, D) or (B, D) broadcast.

    This is the raw cosine. CLIPScore of Hessel et al. 2021 is 2.5 · max(cos, 0)
    (``clip_score_hessel``); torchmetrics' CLIPScore reports 100 · max(cos, 0).
    """
    return F.cosine_similarity(img_feat, text_feat.expand_as(img_feat), dim=-1)


def clip_score_hessel(img_feat: torch.Tensor, text_feat: torch.Tensor, w: float = 2.5) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021, eq. 1): w · max(cos(image, text), 0) with w = 2.5, (B,)."""
    return w * clip_score(img_feat, text_feat).clamp(min=0)


def load_clip(model: str, pretrained: str | os.PathLike | None, device=None, dtype: torch.dtype = torch.float32,
              *, allow_pickle: bool = False, preprocess: dict | None = None, antialias: bool = True) -> Clip:
    """A frozen ``Clip`` from a model name or config JSON and a LOCAL weights file; never downloads.

    ``model``: an open_clip model name (``open_clip.list_models()``; ``/`` reads as ``-``, so
    ``ViT-B/16`` is ``ViT-B-16``) or the path of an open_clip model-config JSON (the
    ``model_configs/*.json`` layout, or an ``open_clip_config.json`` with ``model_cfg`` and
    ``preprocess_cfg``). ``pretrained``: a ``.safetensors`` file (``.pt``/``.pth``/``.bin`` only with
    ``allow_pickle``). ``preprocess`` overrides the preprocessing (``mean``, ``std``, ``size``,
    ``interpolation``, ``resize_mode``); with a weights file open_clip assumes OpenAI's mean/std,
    which OpenAI's and LAION's CLIPs use. ``antialias``: whether the resize to the model's input
    antialiases (``clip.antialias``).
    """
    import open_clip

    weights = _check_pretrained(pretrained, allow_pickle)
    name, cfg, file_preprocess = _model_config(model)
    _check_offline(name, cfg, model)
    dev = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
    force = {**(file_preprocess or {}), **(preprocess or {})}
    try:
        # an absolute path is never one of open_clip's download tags (factory.py create_model looks
        # the tag up first); with a file, the base towers' own pretrained weights are off
        net = open_clip.create_model(name, pretrained=str(weights), device="cpu", pretrained_image=False,
                                     pretrained_text=False, force_preprocess_cfg=force or None,
                                     weights_only=not allow_pickle)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config error: clip.pretrained {str(pretrained)!r} does not load into clip.model "
                          f"{model!r} ({first}); give the checkpoint of that architecture") from None
    net = net.to(device=dev, dtype=dtype)
    pp = open_clip.get_model_preprocess_cfg(net)
    return Clip(net, open_clip.get_tokenizer(name), pp, name, antialias).to(dev)


def _check_pretrained(pretrained, allow_pickle: bool) -> Path:
    if pretrained is None or str(pretrained).strip() == "":
        raise ConfigError(f"config error: clip.pretrained is not set; give a local checkpoint path "
                          f"(.safetensors): {_NO_DOWNLOAD} ({_MAKE_ONE})")
    path = Path(os.path.expanduser(str(pretrained)))
    if not path.is_file():
        raise ConfigError(f"config error: clip.pretrained {str(pretrained)!r}: no such file (download tags "
                          f"are not accepted: {_NO_DOWNLOAD}); give a local checkpoint path ({_MAKE_ONE})")
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return path.resolve()
    if suffix in PICKLE_SUFFIXES:
        if allow_pickle:
            return path.resolve()
        raise ConfigError(f"config error: clip.pretrained {str(pretrained)!r} is a pickle checkpoint; latentshift "
                          "loads safetensors only unless clip.allow_pickle is set (only for files you trust): convert "
                          "it with safetensors.torch.save_file(state_dict, 'clip.safetensors')")
    raise ConfigError(f"config error: clip.pretrained {str(pretrained)!r}: expected a .safetensors file "
                      f"(or {'/'.join(PICKLE_SUFFIXES)} with allow_pickle)")


def _model_config(model: str) -> tuple[str, dict, dict | None]:
    """(registered open_clip name, model config, preprocess config from the file or None)."""
    import open_clip

    if not model or not isinstance(model, str):
        raise ConfigError("config error: clip.model is not set; give an open_clip model name (e.g. "
                          "ViT-B-16-quickgelu) or a model-config .json path")
    if model.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"config error: clip.model {model!r}: hf-hub:/local-dir: names are not accepted "
                          f"({_NO_DOWNLOAD}); give an open_clip model name or a model-config .json path, "
                          "and the weights file as clip.pretrained")
    path = Path(os.path.expanduser(model))
    if model.lower().endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config error: clip.model {model!r}: no such model-config file")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config error: clip.model {model!r}: not a JSON model config ({exc})") from None
        cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(f"config error: clip.model {model!r}: not an open_clip model config (needs "
                              "embed_dim, vision_cfg and text_cfg, at the top or under model_cfg)")
        return _register(path.stem, cfg), cfg, raw.get("preprocess_cfg")
    name = model.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"config error: clip.model {model!r}: open_clip knows no such model; give one of "
                          "open_clip.list_models() (e.g. ViT-B-16-quickgelu) or a model-config .json path")
    return name, cfg, None


def _register(stem: str, cfg: dict) -> str:
    """Register ``cfg`` with open_clip under a name of its own (stem + content hash), so that a
    file called e.g. ViT-B-16.json never shadows open_clip's built-in config of that name."""
    import open_clip

    global _CONFIG_DIR
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{stem}-{digest}"
    if open_clip.get_model_config(name) is None:
        if _CONFIG_DIR is None:
            _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="latentshift-clip-configs-")
        file = Path(_CONFIG_DIR.name) / f"{name}.json"
        file.write_text(json.dumps(cfg))
        open_clip.add_model_config(file)
    return name


def _check_offline(name: str, cfg: dict, model: str) -> None:
    """Refuse what open_clip would fetch from the Hugging Face hub while building the model."""
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name") or "siglip" in name.lower():
        raise ConfigError(f"config error: clip.model {model!r}: its tokenizer or text tower comes from the "
                          f"Hugging Face hub, which open_clip would download ({_NO_DOWNLOAD}); give a model "
                          "with open_clip's own tokenizer, e.g. ViT-B-16-quickgelu")


def check_clip_files(model: str, pretrained: str | os.PathLike, *, allow_pickle: bool = False,
                     shown: str | None = None) -> None:
    """Preflight of what ``load_clip`` will load, without reading a tensor: the checkpoint's suffix
    and pickle policy, its safetensors header and tensor extents (a truncated file fails here), the
    model config (offline), and that the weights' shapes fit that architecture, built on the meta
    device. ``shown``: the checkpoint as the user wrote it (an s3:// URI), for messages."""
    shown = str(shown or pretrained)
    weights = _check_pretrained(pretrained, allow_pickle)
    name, cfg, _ = _model_config(model)
    _check_offline(name, cfg, model)
    if weights.suffix.lower() not in SAFE_SUFFIXES:
        return  # a trusted pickle (allow_pickle): its shapes are known only once it is unpickled, on the actor
    found = _safetensors_shapes(weights, shown)
    expected = _meta_shapes(name, model)
    problems = _clip_mismatch(expected, found)
    if problems:
        raise ConfigError(f"config error: clip.pretrained {shown!r} does not fit clip.model {model!r} ({problems}); "
                          "give the checkpoint of that architecture, or the clip.model it was saved from")


def _safetensors_shapes(path: Path, shown: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from the header; safe_open checks that every tensor lies inside the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a mapping
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types: one line naming the key and file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config error: clip.pretrained {shown!r} is not a valid safetensors file ({first}); "
                          f"it may be truncated or damaged: copy or export it again ({_MAKE_ONE})") from None


def _meta_shapes(name: str, model: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the open_clip architecture ``name``, built on the meta device (no memory)."""
    import logging

    import open_clip

    class _Quiet(logging.Filter):  # open_clip logs "no pretrained weights loaded" on the root logger
        def filter(self, record):
            return "No pretrained weights" not in record.getMessage()

    root, quiet = logging.getLogger(), _Quiet()
    root.addFilter(quiet)
    try:
        net = open_clip.create_model(name, device="meta", load_weights=False, pretrained_image=False,
                                     pretrained_text=False)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config error: clip.model {model!r}: open_clip cannot build it ({first}); "
                          "give an open_clip model name or a valid model-config .json path") from None
    finally:
        root.removeFilter(quiet)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# open_clip's load_checkpoint adds or drops these itself, and resizes positional embeddings to the model
_LOADER_FIXES = ("logit_bias", "position_ids")


def _clip_mismatch(expected: dict, found: dict) -> str:
    found = {k.removeprefix("module."): v for k, v in found.items()}
    missing = [k for k in expected if k not in found and not k.endswith(_LOADER_FIXES)]
    unexpected = [k for k in found if k not in expected and not k.endswith(_LOADER_FIXES)]
    shapes = [k for k in expected if k in found and expected[k] != found[k] and not k.endswith("positional_embedding")]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of another shape, e.g. {k} {list(found[k])} where the model has "
                     f"{list(expected[k])}")
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label} tensors, e.g. {keys[0]}")
    return "; ".join(parts)
