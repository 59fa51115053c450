"""TITAN-preview's vision tower (Ding et al. 2024, MahmoodLab/TITAN), restated on slidefm's
2D-ALiBi transformer blocks.

What the published code computes, and this too:

* grid = floor((coords − min coords) / patch_size_level0) per axis; patches that fall in the
  same cell are summed into one token, cells whose summed feature is all zero are dropped,
  and the tokens are ordered x-major (by x cell, then y cell);
* Linear + GELU input projection; a CLS token (no position) first;
* pre-norm ViT blocks (eps 1e-6, qkv bias, MLP ratio 4) with the 2D ALiBi bias
  −slope_h · Euclidean grid distance (CLS row and column 0), the standard ALiBi slopes; final
  norm;
* ``slide`` = ``attn_pool_contrastive`` (one learned query; multi-head attention with its own
  LayerNorms, eps 1e-5, over all tokens including CLS); ``zero_shot`` = normalize(slide @ proj).

TITAN builds the bias for the whole grid (N × N per head), which needs > 60 GB at 64k tiles;
here it is built per block of query rows by ``slidefm.models.attention`` (linear memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidefm.models.alibi import Alibi2DBias
from slidefm.models.published.base import PublishedSlideEncoder
from slidefm.models.slide_encoder import SlideEncoderConfig, _Block, _Context


class _AttentionalPooler(nn.Module):
    """Learned queries attending over all tokens (CoCa / open_clip attentional pooler)."""

    def __init__(self, dim: int, n_queries: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-5)
        self.ln_k = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, E] → [B, Q, E]."""
        k = self.ln_k(x)
        q = self.ln_q(self.query).to(x.dtype).expand(x.shape[0], -1, -1)
        return self.attn(q, k, k, need_weights=False)[0]


def titan_tokens(
    features: torch.Tensor,
    coords: torch.Tensor,
    patch_size_level0: float,
    return_index: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One slide's patches → TITAN's tokens: (summed features [M, D], grid cells [M, 2] (x, y)).

    features [N, D]; coords [N, 2] level-0 px (x, y). Patches sharing a cell are summed, cells
    whose sum is all zero are dropped, tokens are x-major (sorted by x cell, then y cell).
    ``return_index`` adds index [N]: each input patch's token row, −1 where its cell was dropped.
    """
    c = coords.to(torch.float64)
    cell = torch.floor((c - c.min(dim=0).values) / float(patch_size_level0)).to(torch.int64)
    height = int(cell[:, 1].max()) + 1
    key = cell[:, 0] * height + cell[:, 1]  # x-major cell index
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    summed = features.new_zeros(len(uniq), features.shape[1]).index_add_(0, inverse, features)
    keep = (summed != 0).any(dim=1)
    grid = torch.stack([uniq // height, uniq % height], dim=1)
    if not return_index:
        return summed[keep], grid[keep]
    row = torch.cumsum(keep, 0) - 1  # token row of each kept cell
    index = torch.where(keep[inverse], row[inverse], -1)
    return summed[keep], grid[keep], index


class TitanSlideEncoder(PublishedSlideEncoder):
    """TITAN-preview vision tower; module names = the published keys without ``vision_encoder.``
    (blocks as ``blocks.<i>`` instead of ``blocks.modules_list.<i>``).

    Readouts: ``slide`` (default; TITAN's slide embedding), ``zero_shot`` (unit-norm
    embedding in the text space, for zero-shot with TITAN's text tower).
    """

    readouts = ("slide", "zero_shot")

    def __init__(
        self,
        input_dim: int = 768,
        embed_dim: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pool_queries: int = 128,
        pool_heads: int = 8,
        backend: str = "sdpa",
        attn_block_size: int = 1024,
    ):
        super().__init__()
        self.input_dim, self.embed_dim = input_dim, embed_dim
        self.block_config = SlideEncoderConfig(
            name="titan",
            input_dim=input_dim,
            d_model=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            position="alibi2d",
            attention="full",
            backend=backend,
            attn_block_size=attn_block_size,
            norm_eps=1e-6,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        self.patch_embed = nn.Sequential(nn.Linear(input_dim, embed_dim), nn.GELU())
        self.blocks = nn.ModuleList(_Block(self.block_config, 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = _AttentionalPooler(embed_dim, pool_queries, pool_heads)
        self.attn_pool_contrastive = _AttentionalPooler(embed_dim, 1, pool_heads)
        for p in (self.cls_token, self.attn_pool.query, self.attn_pool_contrastive.query):
            nn.init.normal_(p, std=0.02)  # only seen with weights="random"
        nn.init.normal_(self.proj, std=embed_dim**-0.5)

    def forward_tokens(
        self, features: torch.Tensor, coords: torch.Tensor, patch_size_level0: float
    ) -> torch.Tensor:
        """[N, D], [N, 2] level-0 px → tokens after the final norm [1, 1 + M, E] (CLS first,
        then the M kept cells x-major)."""
        return self._encode(*titan_tokens(features, coords, patch_size_level0))

    def _encode(self, feats: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(feats[None])
        x = torch.cat([self.cls_token.to(x.dtype), x], dim=1)
        bias = Alibi2DBias.from_grid(grid[None], self.block_config.num_heads, num_prefix_tokens=1)
        ctx = _Context(bias=bias, padding_mask=None)
        for blk in self.blocks:
            x = blk(x, ctx)
        return self.norm(x)

    def tile_tokens(self, features, coords, patch_size_level0):
        """Each patch gets its cell's token (patches sharing a cell share it); a patch whose
        cell was dropped (all-zero sum) gets a zero row."""
        feats, grid, index = titan_tokens(features, coords, patch_size_level0, return_index=True)
        tokens = self._encode(feats, grid)
        cells = torch.cat([tokens[0, 1:], tokens.new_zeros(1, tokens.shape[-1])])  # −1: zeros
        return tokens[:, :1], cells[index][None]

    def embed_one(self, features, coords, patch_size_level0, readout):
        tokens = self.forward_tokens(features, coords, patch_size_level0)
        slide = self.attn_pool_contrastive(tokens)[0, 0]
        if readout == "zero_shot":
            return F.normalize(slide @ self.proj.to(slide.dtype), dim=-1)
        return slide


PREFIX = "vision_encoder."
# Keys of the full TITAN model that belong to other towers: not ours, dropped on purpose.
FOREIGN_PREFIXES = ("text_encoder.",)


def convert_titan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published TITAN state dict → our keys: keep ``vision_encoder.*`` (strip the prefix,
    ``blocks.modules_list.<i>`` → ``blocks.<i>``), drop the text tower; anything else is kept
    so that strict loading reports it."""
    out = {}
    for k, v in sd.items():
        if k.startswith(FOREIGN_PREFIXES):
            continue
        if k.startswith(PREFIX):
            k = k[len(PREFIX) :]
        out[k.replace("blocks.modules_list.", "blocks.")] = v
    return out


def export_titan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys → the published vision tower's (``vision_encoder.`` prefix,
    ``blocks.modules_list.<i>``): the inverse of ``convert_titan``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            k = "blocks.modules_list." + k[len("blocks.") :]
        out[PREFIX + k] = v
    return out
