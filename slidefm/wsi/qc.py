"""QC thumbnail: the tissue mask outline and kept tiles drawn on the slide thumbnail, so a
user can see in one glance what was encoded (or, for a slide without tissue, what was seen).

The image carries its own legend: a header with the slide id, level-0 µm/px, tile size in px
and µm and the tile count; a key for the two overlay colours; a scale bar in µm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from slidefm.io.atomic import atomic_path
from slidefm.wsi.tiling import TileGrid

MASK_COLOUR = (0, 170, 0)
TILE_COLOUR = (30, 60, 220)  # bright-field: blue boxes on pink/white
TILE_COLOUR_DARK = (255, 200, 0)  # fluorescence: yellow boxes on a dark background
NICE_UM = (50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000)


@dataclass(frozen=True)
class QCInfo:
    """What the header says. ``level0_mpp`` µm/px; tile side = ``patch_size × target_mpp`` µm."""

    slide_id: str
    level0_mpp: float
    target_mpp: float
    patch_size: int
    modality: str = ""
    note: str = ""  # e.g. "no tissue found" for a failed slide


def scale_bar_um(width_px: int, um_per_px: float, fraction: float = 0.25) -> int:
    """The largest 'nice' length (µm) whose bar is at most ``fraction`` of the image width."""
    limit = width_px * um_per_px * fraction
    fits = [u for u in NICE_UM if u <= limit]
    return fits[-1] if fits else NICE_UM[0]


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans (has 'µ'; shipped with matplotlib, a dependency) or Pillow's default."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def render_qc(
    thumb: np.ndarray,
    mask: np.ndarray,
    scale: float,
    tiles: TileGrid | None,
    info: QCInfo | None = None,
) -> Image.Image:
    """RGB image: header + thumbnail (h, w, 3) with mask edge (green), tile boxes (blue), key
    and scale bar. scale: level-0 px per thumbnail px; ``mask`` (any size) is stretched over
    the thumbnail; ``tiles`` None draws no boxes (slide without tissue)."""
    img = Image.fromarray(thumb).convert("RGB")
    if mask.shape != thumb.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(img.size, Image.Resampling.NEAREST))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, round(min(mask.shape) / 400)))
    arr = np.asarray(img).copy()
    arr[edge] = MASK_COLOUR
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    n_tiles = 0
    tile_colour = TILE_COLOUR_DARK if info and info.modality == "fluorescence" else TILE_COLOUR
    if tiles is not None:
        ext = tiles.extent_level0 / scale
        for x, y in tiles.coords / scale:
            draw.rectangle([x, y, x + ext, y + ext], outline=tile_colour)
        n_tiles = len(tiles)
    if info is None:
        return img
    w, h = img.size
    fs = max(12, round(w / 60))
    font = _font(fs)
    pad = fs // 2
    # Scale bar, bottom-left, on a white box so it reads on tissue and on dark fluorescence.
    um_px = scale * info.level0_mpp
    um = scale_bar_um(w, um_px)
    bar = um / um_px
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um} µm"
    bx, by = pad * 2, h - pad * 2 - fs
    draw.rectangle([bx - pad, by - fs - pad, bx + bar + pad, by + fs // 2 + pad], fill="white")
    draw.rectangle([bx, by, bx + bar, by + max(2, fs // 4)], fill="black")
    draw.text((bx, by - fs - 2), label, fill="black", font=font)
    # Header: title line, detail line, colour key.
    tile_um = info.patch_size * info.target_mpp
    lines = [
        f"{info.slide_id}" + (f" — {info.note}" if info.note else ""),
        f"level 0: {info.level0_mpp:.4g} µm/px · tiles {info.patch_size} px at "
        f"{info.target_mpp:g} µm/px = {tile_um:g} µm · {n_tiles} tiles"
        + (f" · {info.modality}" if info.modality else ""),
    ]
    head_h = pad + len(lines) * (fs + pad) + fs + pad * 2
    out = Image.new("RGB", (w, h + head_h), "white")
    out.paste(img, (0, head_h))
    d = ImageDraw.Draw(out)
    y = pad
    for i, line in enumerate(lines):
        d.text((pad, y), line, fill="black", font=_font(fs + 2) if i == 0 else font)
        y += fs + pad
    x = pad
    for colour, text in ((MASK_COLOUR, "tissue mask outline"), (tile_colour, "encoded tile")):
        d.rectangle([x, y + 2, x + fs, y + fs], outline=colour, width=max(2, fs // 6))
        d.text((x + fs + pad, y), text, fill="black", font=font)
        x += fs + pad * 3 + round(d.textlength(text, font=font))
    return out


def save_qc(
    path: str | Path,
    thumb: np.ndarray,
    mask: np.ndarray,
    scale: float,
    tiles: TileGrid | None,
    info: QCInfo | None = None,
) -> None:
    """Write the QC PNG atomically."""
    img = render_qc(thumb, mask, scale, tiles, info)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
