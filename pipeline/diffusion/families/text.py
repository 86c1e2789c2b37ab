"""Text-conditional latent unets (diffusers' UNet2DConditionModel with a CLIP text encoder and its
tokenizer): Stable Diffusion. The condition of a sample is a prompt; None and the guidance branch
are the empty prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from pipeline.diffusion.families.components import Components
from pipeline.model_layout import TEXT

FAMILY = TEXT
PROMPT_CACHE = 4096  # prompts whose hidden states are kept (batches repeat prompts)


@dataclass
class TextFamily:
    """How a UNet2DConditionModel is conditioned and called: prompts through the text encoder."""

    source: str
    text_encoder: torch.nn.Module
    tokenizer: object
    conditioning: str = "text"
    _prompt_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def conditions(self, items: list) -> list[str]:
        return ["" if c is None else str(c) for c in items]

    def unconditional(self) -> str:
        return ""

    def forward(self, unet: torch.nn.Module, x: torch.Tensor, ts: torch.Tensor, conds: list) -> torch.Tensor:
        hidden = self.prompt_embeddings(conds, x.device).to(x.dtype)
        return unet(x, ts, encoder_hidden_states=hidden).sample

    def prompt_embeddings(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP text-encoder hidden states, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tok = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.text_encoder(tok.input_ids.to(device))[0]
            for p, h in zip(missing, hidden, strict=True):
                self._prompt_cache[p] = h
                if len(self._prompt_cache) > PROMPT_CACHE:
                    self._prompt_cache.popitem(last=False)
        return torch.stack([self._prompt_cache[p] for p in prompts])


def load(parts: Components, unet_config: dict, null_class: int | None) -> TextFamily:
    """The text encoder and tokenizer; a prompt model has no null class (its unconditional is "")."""
    import transformers

    text_encoder = parts.load(_text_encoder_class(parts.config("text_encoder")), "text_encoder")
    tokenizer = transformers.AutoTokenizer.from_pretrained(parts.folders["tokenizer"], local_files_only=True)
    return TextFamily(parts.source, text_encoder, tokenizer)


def build(name: str, config: dict) -> torch.nn.Module:
    """The text encoder (``name`` is FAMILY.encoders' one) from its config, without weights."""
    cls = _text_encoder_class(config)
    return cls(cls.config_class.from_dict(config))


def _text_encoder_class(config: dict):
    import transformers

    return getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0], transformers.CLIPTextModel)
