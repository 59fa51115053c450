"""Per-dimension standardisation ``(x − mean) / std`` with its statistics as buffers.

One mechanism for the four places slidefm z-scores a vector before a learned layer: the slide
encoder's tile-feature input, the CLIP slide embedding, the MIL heads' tile features and slide
embeddings, and the masked-feature-modeling targets. Frozen encoders give features with a large
shared offset and a small per-dimension spread; a randomly initialised layer sees nearly
identical inputs without this.

The statistics are buffers, so checkpoints, ``mil predict`` and heatmaps apply the transform
the model was trained with; ``provenance`` says what they were fitted on (which split, how many
slides/tiles) and travels in the checkpoint's metadata (``slidefm.io.checkpoints``), never in
the state dict (whose keys stay as they were).

Modules that had flat buffers before (``SlideEncoder.input_mean``, ``SlideTextModel.slide_mean``,
``MaskedFeatureModel.target_mean``) hold a ``Standardize`` under a new attribute and keep the old
state-dict keys with :func:`keep_flat_keys`, so old checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_STD = 1e-6  # a constant dimension is divided by this, not by 0


class Standardize(nn.Module):
    """(x − mean) / std over the last dimension; identity (mean 0, std 1) until ``set_stats``.

    mean, std: [D] float32 buffers in the units of x. ``provenance``: what the statistics were
    fitted on (e.g. ``{"fitted_on": "train split", "n_slides": 40, "n_tiles": 51234}``).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.provenance: dict[str, Any] = {}

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @torch.no_grad()
    def set_stats(
        self,
        mean: torch.Tensor | np.ndarray,
        std: torch.Tensor | np.ndarray,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        """Use these statistics [D]; std is clamped to ``MIN_STD``."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(MIN_STD))
        if provenance is not None:
            self.provenance = dict(provenance)

    def fit(
        self, x: torch.Tensor | np.ndarray, provenance: Mapping[str, Any] | None = None
    ) -> None:
        """Statistics of the rows of x [N, D] (sample std; std 1 for a single row)."""
        z = torch.as_tensor(x, dtype=torch.float32)
        std = z.std(0) if len(z) > 1 else torch.ones(z.shape[1])
        self.set_stats(z.mean(0), std, {"n": int(len(z)), **dict(provenance or {})})

    @property
    def is_identity(self) -> bool:
        return bool((self.mean == 0).all() and (self.std == 1).all())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def keep_flat_keys(owner: nn.Module, attr: str, prefix: str) -> None:
    """Keep ``owner``'s state-dict keys ``<prefix>_mean`` / ``<prefix>_std`` for its
    ``Standardize`` at ``owner.<attr>`` (instead of ``<attr>.mean`` / ``<attr>.std``).

    Both directions: ``state_dict()`` writes the flat keys, ``load_state_dict`` reads them, so
    checkpoints written before the ``Standardize`` module existed load exactly as they did.
    """
    pairs = [(f"{attr}.{s}", f"{prefix}_{s}") for s in ("mean", "std")]

    def save_hook(module: nn.Module, state: dict, key_prefix: str, local: Any) -> None:
        for new, old in pairs:
            if key_prefix + new in state:
                state[key_prefix + old] = state.pop(key_prefix + new)

    def load_hook(module: nn.Module, state: dict, key_prefix: str, *args: Any) -> None:
        for new, old in pairs:
            if key_prefix + old in state:
                state[key_prefix + new] = state.pop(key_prefix + old)

    owner._register_state_dict_hook(save_hook)
    owner.register_load_state_dict_pre_hook(load_hook)


def provenance_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: provenance} of every fitted ``Standardize`` inside ``model``."""
    return {
        name: dict(m.provenance)
        for name, m in model.named_modules()
        if isinstance(m, Standardize) and (m.provenance or not m.is_identity)
    }


def restore_provenance(model: nn.Module, recorded: Mapping[str, Mapping[str, Any]]) -> None:
    """Put recorded provenance (from ``provenance_of``) back on the matching modules."""
    mods = dict(model.named_modules())
    for name, prov in (recorded or {}).items():
        m = mods.get(name)
        if isinstance(m, Standardize):
            m.provenance = dict(prov)
