"""2D ALiBi: a per-head linear penalty on the Euclidean grid distance between two tiles.

TITAN's position encoding, as an ``AttentionBias`` (``slidefm.models.bias``): the attention
backends call ``Alibi2DBias.block`` for one block of query rows at a time (or its
``score_mod`` inside FlexAttention), so a slide's N×N bias is never held in memory at once;
``alibi_2d_bias`` materialises the whole (P+N)² bias of one slide (small inputs, tests).
Distances are in grid cells (one cell = one tile), computed in float32 whatever the autocast
dtype, because bf16 cannot tell distance 200 from 201.
"""

from __future__ import annotations

import math

import torch

from slidefm.models.bias import AttentionBias


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


class Alibi2DBias(AttentionBias):
    """TITAN's 2D ALiBi: −slope_h · ‖grid_i − grid_j‖₂ between tiles i, j; 0 in every row and
    column of a prefix (CLS/register) token.

    grid: [B, N, 2] (col, row) cells, any integer or float dtype; slopes: [H] (computed in
    float32 whatever the dtype of the model)."""

    name = "alibi2d"

    def __init__(self, grid: torch.Tensor, slopes: torch.Tensor, num_prefix_tokens: int = 0):
        self.grid = grid.to(torch.float32)
        self.slopes = slopes.to(device=grid.device, dtype=torch.float32)
        self.num_prefix_tokens = num_prefix_tokens
        self._gx = self.grid[..., 0].contiguous()
        self._gy = self.grid[..., 1].contiguous()

    @classmethod
    def from_grid(
        cls, grid: torch.Tensor, num_heads: int, num_prefix_tokens: int = 0
    ) -> Alibi2DBias:
        return cls(grid, alibi_slopes(num_heads), num_prefix_tokens)

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        """float32 [B, H, len(rows), len(cols)]."""
        n_prefix = self.num_prefix_tokens
        bsz = self.grid.shape[0]
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        # empty, not zeros: filling the whole tile cost a third of TITAN's time at 16k tokens;
        # only the prefix rows and columns are zero.
        shape = (bsz, len(self.slopes), r1 - r0, c1 - c0)
        out = self._tile_buffer(shape)
        t0, u0 = max(r0, n_prefix), max(c0, n_prefix)  # first tile row / column of the tile
        out[:, :, : t0 - r0].zero_()
        out[:, :, :, : u0 - c0].zero_()
        if t0 < r1 and u0 < c1:
            # Exact pairwise distances (cdist's matmul shortcut would round them).
            dist = torch.cdist(
                self.grid[:, t0 - n_prefix : r1 - n_prefix],
                self.grid[:, u0 - n_prefix : c1 - n_prefix],
                compute_mode="donot_use_mm_for_euclid_dist",
            )
            torch.mul(
                dist[:, None],
                -self.slopes[None, :, None, None],
                out=out[:, :, t0 - r0 :, u0 - c0 :],
            )
        return out

    def _tile_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uninitialised float32 tile. Without gradients the same memory is reused for every
        block of this forward pass (the kernel is done with a tile before the next is asked
        for): a fresh multi-GB tile per block spent most of its time in page faults."""
        if torch.is_grad_enabled():  # autograd may keep the tile for backward: never reuse
            return torch.empty(shape, dtype=torch.float32, device=self.grid.device)
        buf = getattr(self, "_buffer", None)
        if buf is None or buf.shape != shape:
            buf = self._buffer = torch.empty(shape, dtype=torch.float32, device=self.grid.device)
        return buf

    def score_mod(self, score, b, h, q_idx, kv_idx):
        n_prefix = self.num_prefix_tokens
        qt = (q_idx - n_prefix).clamp(min=0)
        kt = (kv_idx - n_prefix).clamp(min=0)
        dx = self._gx[b, qt] - self._gx[b, kt]
        dy = self._gy[b, qt] - self._gy[b, kt]
        tile = (q_idx >= n_prefix) & (kv_idx >= n_prefix)
        return score - torch.where(tile, self.slopes[h] * torch.sqrt(dx * dx + dy * dy), 0.0)

    def padded(self, extra: int) -> Alibi2DBias:
        grid = torch.nn.functional.pad(self.grid, (0, 0, 0, extra))
        return Alibi2DBias(grid, self.slopes, self.num_prefix_tokens)

    def static_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self._gx, self._gy)


def alibi_2d_bias(grid: torch.Tensor, num_heads: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The whole bias of one slide, materialised: float32 [H, P+N, P+N] (oracle, small N).

    grid: [N, 2] (col, row) grid cells. Entry (h, i, j) = −slope_h · ‖grid_i − grid_j‖₂ for
    tiles i, j and 0 when i or j is one of the P prefix tokens.
    """
    total = slice(0, num_prefix_tokens + grid.shape[0])
    return Alibi2DBias.from_grid(grid[None], num_heads, num_prefix_tokens).block(total, total)[0]
