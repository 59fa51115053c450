"""A published slide encoder behind slidefm's bag interface, so MIL heads and alignment can
use Prov-GigaPath / TITAN / CHIEF like one of slidefm's own encoders.

slidefm's encoders take padded batches ``(features [B, N, D], grid [B, N, 2], padding_mask)``;
the published ones take one slide at a time with *level-0 coordinates* (GigaPath's positions
are absolute 256-px cells, which a relative grid cannot give back). The adapter therefore runs
the published ``embed_one`` slide by slide on the unpadded rows, with the coords and patch size
the bag batch carries (``collate_bags`` pads ``coords`` like the features). No ``no_grad``:
the same module is frozen (MIL head on fixed embeddings) or fine-tuned.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from slidefm.models.published.base import PublishedSlideEncoder


class PublishedBagEncoder(nn.Module):
    """``encoder(features, grid, padding_mask, coords=, patch_size_level0=) -> [B, E]``.

    features: [B, N, D]; grid: [B, N, 2] (unused: positions come from ``coords``);
    padding_mask: [B, N] bool, True = padded row; coords: [B, N, 2] level-0 px (x, y) of each
    tile's top-left corner; patch_size_level0: [B] or a float, tile side in level-0 px.
    ``readout``: one of the published model's single-vector readouts (default: its first).
    ``mask_token``: add the learned input-space mask token ``forward_tokens`` needs for masked
    feature modeling (``slidefm pretrain`` from a published encoder). Hidden tiles' features
    are replaced by it before the published input layer, as slidefm's own encoders do, so the
    published forward stays as it is; it is not part of the published layout.
    """

    needs_coords = True

    def __init__(
        self, published: PublishedSlideEncoder, readout: str | None = None, mask_token: bool = False
    ):
        super().__init__()
        self.published = published
        self.readout = published.check_readout(readout)
        if self.readout in published.all_layer_readouts:
            raise ValueError(
                f"readout {self.readout!r} returns one embedding per layer; a bag encoder needs "
                f"one per slide: choose one of {', '.join(_single(published))}"
            )
        self.input_dim = published.input_dim
        entry = getattr(published, "registry_entry", None)
        self.embed_dim = published.embed_dim  # the readout's width (CHIEF: input_dim)
        self.name = entry.name if entry is not None else type(published).__name__
        self.weights_id = getattr(published, "weights_id", "unknown")
        self.registry_entry = entry
        self.mask_token = nn.Parameter(0.02 * torch.randn(self.input_dim)) if mask_token else None

    @property
    def config(self) -> SimpleNamespace:
        """What masked feature modeling reads: input width D and token width d."""
        return SimpleNamespace(input_dim=self.input_dim, d_model=self.published.embed_dim)

    def forward(
        self,
        features: torch.Tensor,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        patch_size_level0: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        outs = [
            self.published.embed_one(f, c, size, self.readout)
            for _, _, f, c, size in self._slides(features, padding_mask, coords, patch_size_level0)
        ]
        return torch.stack(outs)

    def forward_tokens(
        self,
        features: torch.Tensor,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        patch_size_level0: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix [B, P, E], tiles [B, N, E]): the published model's final tokens, one per
        input tile in input order, zero on padded rows. token_mask [B, N] bool, True = hidden:
        the tile's features are replaced by ``mask_token`` before the published input layer."""
        if token_mask is not None:
            if self.mask_token is None:
                raise ValueError("masking tokens needs PublishedBagEncoder(..., mask_token=True)")
            mask_row = self.mask_token.to(features.dtype)
            features = torch.where(token_mask[..., None], mask_row, features)
        prefixes, tiles = [], None
        for b, keep, f, c, size in self._slides(features, padding_mask, coords, patch_size_level0):
            prefix, tok = self.published.tile_tokens(f, c, size)
            if tiles is None:
                tiles = tok.new_zeros(features.shape[0], features.shape[1], tok.shape[-1])
            tiles[b, keep] = tok[0]
            prefixes.append(prefix)
        return torch.cat(prefixes), tiles

    def _slides(self, features, padding_mask, coords, patch_size_level0):
        """(b, real-row mask [N], features [n, D] in the model's dtype, coords [n, 2], patch
        size) per slide."""
        if coords is None or patch_size_level0 is None:
            raise ValueError(
                f"published slide encoder {self.name!r} needs each tile's level-0 coords and "
                "the patch size (feature files carry them; bags from `FeatureBagDataset` pass "
                "them as `coords` / `patch_size_level0`)"
            )
        bsz, n = features.shape[:2]
        pad = (
            torch.zeros(bsz, n, dtype=torch.bool, device=features.device)
            if padding_mask is None
            else padding_mask
        )
        size = torch.as_tensor(patch_size_level0, dtype=torch.float64).reshape(-1).expand(bsz)
        dtype = next(self.published.parameters()).dtype
        for b in range(bsz):
            keep = ~pad[b]
            if not bool(keep.any()):
                raise ValueError("a slide without tiles has no embedding")
            yield b, keep, features[b][keep].to(dtype), coords[b][keep], float(size[b])

    def config_record(self) -> dict[str, Any]:
        """What a MIL checkpoint records to rebuild this encoder (its weights are saved with
        the head): registry name, architecture overrides, readout."""
        arch = getattr(self.published, "arch_overrides", {})
        return {"published": self.name, "arch": dict(arch), "readout": self.readout}

    def extra_repr(self) -> str:
        return f"{self.name}, readout={self.readout!r}"


def bag_encoder_from_record(record: dict[str, Any]) -> PublishedBagEncoder:
    """The architecture recorded by ``config_record`` (random weights: a checkpoint loads its own)."""
    return published_bag_encoder(
        record["published"], "random", record.get("readout"), **record["arch"]
    )


def position_inputs(encoder: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs ``encoder`` needs beyond (features, grid, padding_mask): level-0
    coords and patch size for published encoders, nothing for slidefm's own."""
    if not getattr(encoder, "needs_coords", False):
        return {}
    if "coords" not in batch:
        raise ValueError(
            "this batch has no level-0 coords (bags from FeatureBagDataset carry them)"
        )
    return {"coords": batch["coords"], "patch_size_level0": batch["patch_size_level0"]}


def _single(published: PublishedSlideEncoder) -> list[str]:
    return [r for r in published.readouts if r not in published.all_layer_readouts]


def published_bag_encoder(
    name: str, weights: Any = "random", readout: str | None = None, **arch: Any
) -> PublishedBagEncoder:
    """``create_slide_encoder(name, weights, **arch)`` wrapped for bags (see the class)."""
    from slidefm.models.registry import create_slide_encoder, is_published

    enc = create_slide_encoder(name, weights=weights, **arch)
    if not is_published(enc):
        raise ValueError(f"{name!r} is a slidefm config, not a published slide encoder")
    return PublishedBagEncoder(enc, readout)
