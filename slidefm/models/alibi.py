"""2D ALiBi: a per-head linear penalty on the Euclidean grid distance between two tiles.

TITAN's position encoding. ``alibi_2d_bias`` materialises the whole (P+N)² bias and exists
for small inputs and as the test oracle; the attention backends call ``alibi_2d_bias_block``
for one block of query rows at a time, so a slide's N×N bias is never held in memory at once.
Distances are in grid cells (one cell = one tile), computed in float32 whatever the autocast
dtype, because bf16 cannot tell distance 200 from 201.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022; BLOOM's recipe for any head count): float32 [H].

    For H a power of two the slopes are the geometric sequence 2^(-8k/H), k = 1..H. Otherwise
    take the H' = 2^floor(log2 H) slopes of H', then the odd-indexed extra slopes
    2^(-4k/H'), k = 1, 3, 5, …, of 2H' heads until H slopes are filled.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be ≥ 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base**k for k in range(1, closest + 1)]
    if closest < num_heads:
        extra_base = 2.0 ** (-8.0 / (2 * closest))
        n_extra = num_heads - closest
        slopes += [extra_base**k for k in range(1, 2 * n_extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_2d_bias_block(
    grid: torch.Tensor,
    slopes: torch.Tensor,
    q_start: int,
    q_end: int,
    num_prefix_tokens: int = 0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bias rows ``[q_start, q_end)`` of the token sequence (P prefix tokens, then N tiles).

    grid: [B, N, 2] (col, row) grid cells, any integer or float dtype; slopes: [H];
    key_padding_mask: [B, P+N] bool, True = padded key (bias −inf). Returns float32
    [B, H, q_end − q_start, P+N] = −slope_h · ‖grid_i − grid_j‖₂ between tiles and 0 in every
    row and column of a prefix (CLS/register) token.
    """
    bsz, n_tiles, _ = grid.shape
    n_prefix = num_prefix_tokens
    total = n_prefix + n_tiles
    heads = slopes.shape[0]
    g = grid.to(torch.float32)
    out = torch.empty(bsz, heads, q_end - q_start, total, dtype=torch.float32, device=grid.device)
    t0 = max(q_start, n_prefix)  # first tile row in the block
    out[:, :, : t0 - q_start] = 0.0  # prefix rows
    out[:, :, :, :n_prefix] = 0.0  # prefix columns
    if t0 < q_end:
        # Exact pairwise distances (cdist's matmul shortcut would round them): [B, bq_tiles, N].
        dist = torch.cdist(
            g[:, t0 - n_prefix : q_end - n_prefix], g, compute_mode="donot_use_mm_for_euclid_dist"
        )
        slopes32 = slopes.to(device=grid.device, dtype=torch.float32)
        torch.mul(
            dist[:, None], -slopes32[None, :, None, None], out=out[:, :, t0 - q_start :, n_prefix:]
        )
    if key_padding_mask is not None:
        out.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
    return out


def alibi_2d_bias(grid: torch.Tensor, num_heads: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The whole bias of one slide, materialised: float32 [H, P+N, P+N] (oracle, small N).

    grid: [N, 2] (col, row) grid cells. Entry (h, i, j) = −slope_h · ‖grid_i − grid_j‖₂ for
    tiles i, j and 0 when i or j is one of the P prefix tokens.
    """
    total = num_prefix_tokens + grid.shape[0]
    return alibi_2d_bias_block(grid[None], alibi_slopes(num_heads), 0, total, num_prefix_tokens)[0]
