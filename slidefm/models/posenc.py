"""Absolute 2D sin-cos position embedding of tile grid cells (MAE / Prov-GigaPath style).

Computed from the grid on the fly, so any slide size works without a learned table.
"""

from __future__ import annotations

import torch


def sincos_2d(grid: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """grid: [..., 2] (col, row) cells → float32 [..., dim]: sin/cos of col in the first half,
    of row in the second, at dim/4 geometric frequencies 1 … 1/temperature. dim % 4 == 0."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (
        torch.arange(quarter, dtype=torch.float32, device=grid.device) / quarter
    )
    g = grid.to(torch.float32)
    parts = []
    for axis in (0, 1):
        angle = g[..., axis, None] * omega
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=-1)
