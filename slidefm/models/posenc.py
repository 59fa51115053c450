"""Absolute 2D sin-cos position embedding of tile grid cells (MAE / Prov-GigaPath style).

Computed from the grid on the fly, so any slide size works without a learned table.
"""

from __future__ import annotations

import torch


def sincos_2d(
    grid: torch.Tensor,
    dim: int,
    temperature: float = 10000.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """grid: [..., 2] (col, row) cells → float32 [..., dim]: sin/cos of col in the first half,
    of row in the second, at dim/4 geometric frequencies 1 … 1/temperature. dim % 4 == 0.

    ``compute_dtype=torch.float64`` computes angles and sin/cos in float64 before the cast to
    float32, as MAE / Prov-GigaPath's numpy table does (float32 angles of cell 1000 are off
    by ~6e-5)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (
        torch.arange(quarter, dtype=compute_dtype, device=grid.device) / quarter
    )
    g = grid.to(compute_dtype)
    parts = []
    for axis in (0, 1):
        angle = g[..., axis, None] * omega
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=-1).to(torch.float32)
