"""What every published slide encoder shares: ``embed`` over a batch, readout names."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class PublishedSlideEncoder(nn.Module):
    """Base class: subclasses implement ``embed_one`` for one slide ([N, D], [N, 2])."""

    readouts: ClassVar[tuple[str, ...]] = ()
    all_layer_readouts: ClassVar[tuple[str, ...]] = ()
    input_dim: int
    embed_dim: int

    def check_readout(self, readout: str | None) -> str:
        readout = readout or self.readouts[0]
        if readout not in self.readouts:
            raise ValueError(
                f"{type(self).__name__} has readouts {', '.join(self.readouts)}; got {readout!r}"
            )
        return readout

    @torch.no_grad()
    def embed(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        patch_size_level0: float,
        readout: str | None = None,
    ) -> torch.Tensor:
        """Slide embeddings from tile features.

        features: [B, N, D] (D = ``input_dim``); coords: [B, N, 2] level-0 px (x, y) of each
        tile's top-left corner, as written in feature files; patch_size_level0: tile side in
        level-0 px. Returns [B, E], or [L + 1, B, E] for all-layer readouts. Every row of a
        batch is a real tile (slides of different lengths: call once per slide), as in the
        published code, which has no padding mask.
        """
        readout = self.check_readout(readout)
        if features.dim() != 3 or coords.shape != (*features.shape[:2], 2):
            raise ValueError(
                f"features must be [B, N, D] and coords [B, N, 2]; got {list(features.shape)} "
                f"and {list(coords.shape)}"
            )
        if features.shape[-1] != self.input_dim:
            raise ValueError(
                f"features are {features.shape[-1]}-d but {type(self).__name__} expects "
                f"{self.input_dim}-d tile features"
            )
        if features.shape[1] == 0:
            raise ValueError("a slide without tiles has no embedding")
        dtype = next(self.parameters()).dtype
        outs = [
            self.embed_one(features[b].to(dtype), coords[b], float(patch_size_level0), readout)
            for b in range(features.shape[0])
        ]
        dim = 1 if readout in self.all_layer_readouts else 0
        return torch.stack(outs, dim=dim)

    def embed_one(
        self, features: torch.Tensor, coords: torch.Tensor, patch_size_level0: float, readout: str
    ) -> torch.Tensor:
        raise NotImplementedError

    def tile_tokens(
        self, features: torch.Tensor, coords: torch.Tensor, patch_size_level0: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One slide's final tokens for masked feature modeling: (prefix [1, P, E], tiles
        [1, N, E], one row per *input* tile, in input order). features [N, D]; coords [N, 2]
        level-0 px (x, y) of each tile's top-left corner."""
        raise ValueError(
            f"{type(self).__name__} has no token per tile to pretrain with masked feature "
            "modeling (slidefm pretrain); gigapath and titan have"
        )
