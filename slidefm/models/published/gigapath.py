"""Prov-GigaPath's slide encoder (Xu et al. 2024, ``gigapath_slide_enc12l768d``), restated.

What the published code computes (prov-gigapath @ 09d8e876, torchscale LongNet), and this too:

* tokens = Linear(D → E) (no activation) + 2D sin-cos position of the tile's cell on an
  *absolute* lattice: cell = floor(coord / 256) per axis (level-0 px, whatever the slide's
  magnification; ``patch_size_level0`` is not used, as in the original), table row
  ``floor(x/256)·1000 + floor(y/256)`` (rows beyond 1000 wrap, as indexing the published
  table does), layout [y part | x part], computed in float64 and cast to float32;
  a CLS token with a zero position first, then the tiles in input order;
* LongNet blocks (pre-norm, eps 1e-5): LN → q, k, v → dilated attention with the zero padding
  *attended* (``padding="torchscale"``) → sub-LayerNorm → out projection; LN → fc1 → GELU
  (in float32) → sub-LayerNorm over the hidden width → fc2;
* ``encoder.layer_norm`` (eps 1e-5), then ``norm`` (eps 1e-6) in the readout.

Only the positions of the tiles present are computed: the published model holds the whole
1,000,001 × 768 table (3 GB in float32), this never does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from slidefm.models.dilated import DilatedAttention
from slidefm.models.posenc import sincos_2d
from slidefm.models.published.base import PublishedSlideEncoder

SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
DILATION_RATIOS = (1, 2, 4, 8, 16)


class _DilatedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float, segments, dilations, backend: str):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)
        self.core = DilatedAttention(segments, dilations, backend, padding="torchscale")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = rearrange(self.core(q, k, v), "b h n d -> b n (h d)")
        return self.out_proj(self.inner_attn_ln(out))


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x).float()).type_as(x)  # torchscale runs the activation in float32
        return self.fc2(self.ffn_layernorm(h))


class _Layer(nn.Module):
    def __init__(self, dim, heads, hidden, eps, segments, dilations, backend):
        super().__init__()
        self.self_attn = _DilatedSelfAttention(dim, heads, eps, segments, dilations, backend)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = _FFN(dim, hidden, eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class _Encoder(nn.Module):
    def __init__(self, depth, dim, heads, hidden, eps, segments, dilations, backend):
        super().__init__()
        self.layers = nn.ModuleList(
            _Layer(dim, heads, hidden, eps, segments, dilations, backend) for _ in range(depth)
        )
        self.layer_norm = nn.LayerNorm(dim, eps=eps)


class GigaPathSlideEncoder(PublishedSlideEncoder):
    """Prov-GigaPath LongNetViT; module names = the published ``slide_encoder.pth`` keys.

    Readouts: ``cls`` (default; norm(final)[CLS]), ``mean`` (norm of the mean tile token, mean
    taken before the norm), ``all_cls`` / ``all_mean`` ([depth + 1, B, E] from the hidden
    states before ``encoder.layer_norm``, index 0 = input of layer 1; TRIDENT uses layer 11
    with mean pooling).
    """

    readouts = ("cls", "mean", "all_cls", "all_mean")
    all_layer_readouts = ("all_cls", "all_mean")

    def __init__(
        self,
        input_dim: int = 1536,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        segment_lengths: tuple[int, ...] = SEGMENT_LENGTHS,
        dilation_ratios: tuple[int, ...] = DILATION_RATIOS,
        tile_size: int = 256,
        slide_ngrids: int = 1000,
        backend: str = "sdpa",
        segment_length: tuple[int, ...] | None = None,
        dilated_ratio: tuple[int, ...] | None = None,
    ):
        """``segment_length`` / ``dilated_ratio``: torchscale's names for the same options."""
        super().__init__()
        segment_lengths = segment_length if segment_length is not None else segment_lengths
        dilation_ratios = dilated_ratio if dilated_ratio is not None else dilation_ratios
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f"embed_dim {embed_dim} must divide by num_heads and by 4")
        self.input_dim, self.embed_dim, self.depth = input_dim, embed_dim, depth
        self.tile_size, self.slide_ngrids = tile_size, slide_ngrids
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(input_dim, embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.encoder = _Encoder(
            depth,
            embed_dim,
            num_heads,
            hidden,
            1e-5,
            tuple(segment_lengths),
            tuple(dilation_ratios),
            backend,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.normal_(self.cls_token, std=0.02)  # only seen with weights="random"

    def positions(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [N, 2] level-0 px (x, y) → float32 [N, E] sin-cos rows of the published table."""
        cell = torch.floor(coords.to(torch.float64) / self.tile_size).to(torch.int64)
        row = cell[:, 0] * self.slide_ngrids + cell[:, 1]  # published table row − 1
        if bool((row < 0).any()) or bool((row >= self.slide_ngrids**2).any()):
            raise ValueError(
                f"Prov-GigaPath positions cover level-0 coords [0, {self.tile_size * self.slide_ngrids})"
                " per axis; these tiles fall outside its position table"
            )
        i, j = row // self.slide_ngrids, row % self.slide_ngrids  # i: x cell, j: y cell (wrapped)
        return sincos_2d(torch.stack([j, i], dim=-1), self.embed_dim, compute_dtype=torch.float64)

    def hidden_states(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        """[N, D], [N, 2] → the depth + 1 hidden states [1, N + 1, E] (before ``layer_norm``),
        each passed through ``reduce`` as soon as it exists; ``last_only`` keeps only the last.
        A readout keeps only what it needs: the 13 states of a 64k-tile slide are 2.6 GB."""
        x = self.patch_embed.proj(features[None])
        x = x + self.positions(coords).to(x.dtype)[None]
        x = torch.cat([self.cls_token.to(x.dtype), x], dim=1)
        keep = reduce or (lambda t: t)
        kept = [] if last_only else [keep(x)]
        for layer in self.encoder.layers:
            x = layer(x)
            if not last_only:
                kept.append(keep(x))
        return [keep(x)] if last_only else kept

    def forward_tokens(self, features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """[N, D], [N, 2] → tokens after ``encoder.layer_norm``: [1, N + 1, E] (CLS first)."""
        return self.hidden_states(features, coords, self.encoder.layer_norm, last_only=True)[0]

    def tile_tokens(self, features, coords, patch_size_level0):
        tokens = self.forward_tokens(features, coords)  # tiles stay in input order
        return tokens[:, :1], tokens[:, 1:]

    def embed_one(self, features, coords, patch_size_level0, readout):
        def pool(x: torch.Tensor) -> torch.Tensor:
            if readout.endswith("mean"):
                return self.norm(x[:, 1:].mean(dim=1))[0]
            return self.norm(x)[0, 0]

        if readout in self.all_layer_readouts:
            return torch.stack(self.hidden_states(features, coords, pool))
        return pool(self.forward_tokens(features, coords))


def convert_gigapath(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published ``slide_encoder.pth`` → our keys: unwrap ``{"model": …}``; drop ``pos_embed``
    (the published sin-cos table, a non-persistent buffer we compute on the fly)."""
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return {k: v for k, v in sd.items() if k != "pos_embed"}


def export_gigapath(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Our keys → the published ``slide_encoder.pth`` layout (``{"model": state_dict}``, no
    ``pos_embed``: the published model rebuilds that table itself)."""
    return {"model": dict(sd)}
