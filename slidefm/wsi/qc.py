"""QC thumbnail: the tissue mask outline and kept tiles drawn on the slide thumbnail, so a
user can see in one glance what was encoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from slidefm.io.atomic import atomic_path
from slidefm.wsi.tiling import TileGrid


def render_qc(thumb: np.ndarray, mask: np.ndarray, scale: float, tiles: TileGrid) -> Image.Image:
    """RGB image: thumbnail (h, w, 3), mask edge in green, tile boxes in blue.

    scale: level-0 px per thumbnail px; ``mask`` (any size) is stretched over the thumbnail.
    """
    img = Image.fromarray(thumb).convert("RGB")
    if mask.shape != thumb.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(img.size, Image.Resampling.NEAREST))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, round(min(mask.shape) / 400)))
    arr = np.asarray(img).copy()
    arr[edge] = (0, 200, 0)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    ext = tiles.extent_level0 / scale
    for x, y in tiles.coords / scale:
        draw.rectangle([x, y, x + ext, y + ext], outline=(30, 60, 220))
    return img


def save_qc(
    path: str | Path, thumb: np.ndarray, mask: np.ndarray, scale: float, tiles: TileGrid
) -> None:
    """Write the QC PNG atomically."""
    img = render_qc(thumb, mask, scale, tiles)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
