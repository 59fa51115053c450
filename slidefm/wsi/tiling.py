"""TileGrid: where the tiles of a slide are, at an exact target µm/px.

Tiles lie on an integer lattice of level-0 pixels with step ``stride_level0`` starting at
(0, 0). Each tile covers exactly ``patch_size × target_mpp`` µm (``extent_level0`` level-0 px,
a float), so its pixels are resampled from the source at the exact resolution; only its
top-left corner is snapped to the integer lattice (≤ 0.5 level-0 px).

Border tiles (``border``): ``"drop"`` keeps only tiles wholly inside the slide (the right and
bottom strips narrower than a tile are lost); ``"pad"`` also keeps tiles that start inside
the slide and run past its edge; the reader fills the part outside the scan with white
(background glass), never black. Their tissue fraction counts the outside as background.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slidefm.io.features import grid_from_coords
from slidefm.wsi.modes import BORDER_MODES
from slidefm.wsi.tissue import area_fraction


class EmptyTissueError(ValueError):
    """No tile passes the tissue threshold."""


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide.

    coords: (N, 2) int64 level-0 (x, y) top-left; grid: (N, 2) int32 (col, row);
    tissue_fraction: (N,) float32; extent_level0: tile side in level-0 px (float);
    stride_level0: lattice step in level-0 px (int); patch_size: output tile side in px.
    """

    coords: np.ndarray
    grid: np.ndarray
    tissue_fraction: np.ndarray
    patch_size: int
    target_mpp: float
    level0_mpp: float
    extent_level0: float
    stride_level0: int
    overlap: int
    border: str = "drop"

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def patch_size_level0(self) -> int:
        """Tile side in whole level-0 pixels (TRIDENT/CLAM attr; exact extent is ``extent_level0``)."""
        return round(self.extent_level0)


def make_tile_grid(
    width: int,
    height: int,
    level0_mpp: float,
    mask: np.ndarray,
    mask_scale: float,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.1,
    border: str = "drop",
) -> TileGrid:
    """Lay tiles over a ``width``×``height`` level-0 slide and keep those on tissue.

    mask: (h, w) bool tissue mask of a thumbnail; mask_scale: level-0 px per mask px.
    overlap: pixels (at target µm/px) shared by neighbouring tiles.
    border: ``"drop"`` (whole tiles inside the slide only) or ``"pad"`` (see module doc).
    Raises ``EmptyTissueError`` when no tile passes.
    """
    if border not in BORDER_MODES:
        raise ValueError(f"border must be one of {', '.join(BORDER_MODES)}, got {border!r}")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size), got {overlap}")
    extent = patch_size * target_mpp / level0_mpp
    stride = round((patch_size - overlap) * target_mpp / level0_mpp)
    if stride < 1:
        raise ValueError(
            f"tile stride < 1 level-0 px (target_mpp={target_mpp}, level0_mpp={level0_mpp})"
        )
    if border == "pad":
        xs = np.arange(0, width, stride, dtype=np.int64)
        ys = np.arange(0, height, stride, dtype=np.int64)
    else:
        xs = np.arange(0, max(0.0, width - extent) + 1, stride, dtype=np.int64)
        ys = np.arange(0, max(0.0, height - extent) + 1, stride, dtype=np.int64)
        if extent > width or extent > height:
            xs, ys = xs[:0], ys[:0]
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    boxes = np.concatenate([coords, coords + extent], axis=1) / mask_scale
    frac = area_fraction(mask, boxes) if len(coords) else np.zeros(0, np.float32)
    keep = frac >= min_tissue
    if not keep.any():
        raise EmptyTissueError(
            f"no tile has ≥ {min_tissue:.0%} tissue ({len(coords)} candidate tiles); "
            "check the QC thumbnail, lower --min-tissue, or adjust the tissue settings"
        )
    coords, frac = coords[keep], frac[keep]
    return TileGrid(
        coords=coords,
        grid=grid_from_coords(coords, stride),
        tissue_fraction=frac,
        patch_size=patch_size,
        target_mpp=target_mpp,
        level0_mpp=level0_mpp,
        extent_level0=float(extent),
        stride_level0=int(stride),
        overlap=overlap,
        border=border,
    )
