"""One adapter per model family behind the ``Denoiser``'s ε seam, as k-diffusion keeps each model
family in an adapter (``k_diffusion/external.py``).

A family's folder layout (its unet class, the folders it needs) is described in
``pipeline/model_layout.py``, which the model store checks folders against too. Its adapter module
here holds the rest, as module-level names:

- ``FAMILY``: its entry of ``pipeline.model_layout.FAMILIES``;
- ``load(parts, unet_config, null_class)``: its conditioning networks, loaded from ``Components``,
  as an object with ``conditioning`` ("none" | "class" | "text"), ``conditions(items)`` (one checked
  condition per sample), ``unconditional()`` (the condition of the guidance branch) and
  ``forward(unet, x, ts, conds)`` (the network's raw output for x_t at timesteps ts);
- ``build(name, config)``, for a family with ``encoders``: the network of one of them from its
  config, without weights (``check_weights_fit`` builds it on the meta device).

The first stage of a latent model (``first_stage.py``) goes with any family. A new family is a
module here, its ``Family`` entry, and a line below.
"""

from __future__ import annotations

from pipeline.diffusion.families import pixel, text
from pipeline.model_layout import Family

ADAPTERS = {module.FAMILY.name: module for module in (pixel, text)}


def adapter(family: Family):
    """The adapter module of ``family``."""
    return ADAPTERS[family.name]
