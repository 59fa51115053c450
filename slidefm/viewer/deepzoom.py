"""Deep Zoom geometry and overlay tiles.

Slide tiles come from OpenSlide's ``DeepZoomGenerator``. Overlays are second Deep Zoom images
of the same size, tile size and overlap, rendered here as RGBA PNG tiles, so OpenSeadragon
stacks them pixel-exactly over the slide and sets their opacity on the GPU-free canvas.

Coordinates: Deep Zoom level ``L`` of ``n`` levels is level 0 downsampled by
``d = 2 ** (n - 1 - L)``; its pixel ``i`` covers level-0 pixels ``[i·d, (i+1)·d)``. A tile
``(col, row)`` starts at level-``L`` pixel ``col·T − overlap`` (no overlap on the first
column/row) — the same addressing the DZI descriptor gives the browser.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image
from scipy import ndimage

from slidefm.eval.heatmap import score_canvas

TILE_SIZE = 254
OVERLAP = 1
TILE_TYPES = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}


class TileAddressError(LookupError):
    """A Deep Zoom level or tile address outside the pyramid (→ HTTP 404)."""


@dataclasses.dataclass(frozen=True)
class DZGeometry:
    """Deep Zoom pyramid of a ``width`` × ``height`` level-0 image (OpenSlide's layout)."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    @property
    def level_count(self) -> int:
        return (max(self.width, self.height) - 1).bit_length() + 1

    def downsample(self, level: int) -> int:
        return 2 ** (self.level_count - 1 - level)

    def level_size(self, level: int) -> tuple[int, int]:
        d = self.downsample(level)
        return max(1, math.ceil(self.width / d)), max(1, math.ceil(self.height / d))

    def level_tiles(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of tile (col, row) in level-``level`` pixels, overlap included.
        Raises ``TileAddressError`` outside the pyramid."""
        if not 0 <= level < self.level_count:
            raise TileAddressError(f"level {level} outside 0..{self.level_count - 1}")
        (lw, lh), (tc, tr) = self.level_size(level), self.level_tiles(level)
        if not (0 <= col < tc and 0 <= row < tr):
            raise TileAddressError(f"tile ({col}, {row}) outside {tc}×{tr} tiles of level {level}")
        t, o = self.tile_size, self.overlap
        out = []
        for i, lim, n in ((col, lw, tc), (row, lh, tr)):
            tl, br = o * (i > 0), o * (i < n - 1)
            out.append((i * t - tl, min(t, lim - i * t) + tl + br))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def dzi(self, fmt: str) -> str:
        """The DZI XML descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f"Format={quoteattr(fmt)} Overlap={quoteattr(str(self.overlap))} "
            f"TileSize={quoteattr(str(self.tile_size))}>"
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>'
        )


def encode_image(img: Image.Image, fmt: str, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    if TILE_TYPES[fmt] == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class LRUBytes:
    """Thread-safe LRU of encoded tiles (bytes), bounded by total size in bytes."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: Any, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
                return v
        v = make()  # outside the lock: concurrent misses render in parallel
        if self.max_bytes > 0 and len(v) <= self.max_bytes:
            with self._lock:
                if key not in self._d:
                    self._d[key] = v
                    self._size += len(v)
                while self._size > self.max_bytes:
                    _, old = self._d.popitem(last=False)
                    self._size -= len(old)
        return v

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._size = 0


# -- overlay rendering ------------------------------------------------------------------------
def _tile_origin_level0(geom: DZGeometry, level: int, col: int, row: int):
    x, y, w, h = geom.tile_box(level, col, row)
    d = geom.downsample(level)
    return x, y, w, h, d


def boxes_in_tile(
    coords: np.ndarray, s: float, x: int, y: int, w: int, h: int, d: int
) -> np.ndarray:
    """Indices of level-0 boxes [cx, cx+s) × [cy, cy+s) that meet the tile's level-0 area."""
    c = np.asarray(coords, dtype=np.float64)
    x0, y0, x1, y1 = x * d, y * d, (x + w) * d, (y + h) * d
    keep = (c[:, 0] < x1) & (c[:, 0] + s > x0) & (c[:, 1] < y1) & (c[:, 1] + s > y0)
    return np.flatnonzero(keep)


def heat_tile(
    geom: DZGeometry,
    level: int,
    col: int,
    row: int,
    coords: np.ndarray,
    s: float,
    values01: np.ndarray,
    cmap: str = "jet",
) -> Image.Image:
    """RGBA tile: ``cmap(value)`` where tiles are (overlaps averaged, as in ``render_heatmap``),
    transparent elsewhere. ``values01`` (N,) in [0, 1]."""
    import matplotlib

    x, y, w, h, d = _tile_origin_level0(geom, level, col, row)
    idx = boxes_in_tile(coords, s, x, y, w, h, d)
    out = np.zeros((h, w, 4), np.uint8)
    if idx.size:
        rel = np.asarray(coords, np.float64)[idx] - (x * d, y * d)
        canvas, covered = score_canvas((h, w), float(d), rel, s, np.asarray(values01)[idx])
        rgb = np.asarray(matplotlib.colormaps[cmap](canvas))[..., :3] * 255.0
        out[..., :3] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        out[..., 3] = covered * 255
    return Image.fromarray(out, "RGBA")


def grid_tile(
    geom: DZGeometry,
    level: int,
    col: int,
    row: int,
    coords: np.ndarray,
    s: float,
    colour: tuple[int, int, int] = (30, 60, 220),
) -> Image.Image:
    """RGBA tile with each feature tile's level-0 box outlined (1 px; 2 px when a box spans
    ≥ 32 px). Box pixels: [floor(cx/d), ceil((cx+s)/d)) as in ``score_canvas``."""
    x, y, w, h, d = _tile_origin_level0(geom, level, col, row)
    idx = boxes_in_tile(coords, s, x, y, w, h, d)
    edge = np.zeros((h, w), bool)
    lw = 2 if s / d >= 32 else 1
    for cx, cy in np.asarray(coords, np.float64)[idx] - (x * d, y * d):
        x0, y0 = int(np.floor(cx / d)), int(np.floor(cy / d))
        x1, y1 = max(x0 + 1, int(np.ceil((cx + s) / d))), max(y0 + 1, int(np.ceil((cy + s) / d)))
        cxa, cxb, cya, cyb = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
        if cxa >= cxb or cya >= cyb:
            continue
        for yy in (range(y0, y0 + lw), range(y1 - lw, y1)):
            for r in yy:
                if 0 <= r < h:
                    edge[r, cxa:cxb] = True
        for xx in (range(x0, x0 + lw), range(x1 - lw, x1)):
            for c in xx:
                if 0 <= c < w:
                    edge[cya:cyb, c] = True
    out = np.zeros((h, w, 4), np.uint8)
    out[edge] = (*colour, 255)
    return Image.fromarray(out, "RGBA")


def mask_outline_tile(
    geom: DZGeometry,
    level: int,
    col: int,
    row: int,
    mask: np.ndarray,
    mask_scale: float,
    colour: tuple[int, int, int] = (0, 200, 0),
) -> Image.Image:
    """RGBA tile with the tissue mask's outline, 2 px wide at every zoom.

    ``mask`` (mh, mw) bool with ``mask_scale`` level-0 px per mask px; each tile pixel takes
    the mask value at its centre (nearest), and the outline is the mask minus its erosion,
    computed with a 1-px margin so edges across tile borders are continuous."""
    x, y, w, h, d = _tile_origin_level0(geom, level, col, row)
    mh, mw = mask.shape
    xs = (np.arange(x - 2, x + w + 2) + 0.5) * d / mask_scale
    ys = (np.arange(y - 2, y + h + 2) + 0.5) * d / mask_scale
    ix, iy = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    vx, vy = (ix >= 0) & (ix < mw), (iy >= 0) & (iy < mh)
    m = mask[np.clip(iy, 0, mh - 1)][:, np.clip(ix, 0, mw - 1)] & vy[:, None] & vx[None, :]
    edge = m & ~ndimage.binary_erosion(m, iterations=2, border_value=0)
    edge = edge[2:-2, 2:-2]
    out = np.zeros((h, w, 4), np.uint8)
    out[edge] = (*colour, 255)
    return Image.fromarray(out, "RGBA")


def colour_stops(cmap: str = "jet", n: int = 11) -> list[str]:
    """``n`` hex colours of ``cmap`` from 0 to 1, for the legend's CSS gradient."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    return [
        "#{:02x}{:02x}{:02x}".format(*(int(round(c * 255)) for c in cm(v)[:3]))
        for v in np.linspace(0, 1, n)
    ]
