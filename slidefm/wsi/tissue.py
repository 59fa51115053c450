"""Tissue detection on a thumbnail, for bright-field (H&E, IHC) and fluorescence slides,
then morphological clean-up and hole filling.

Bright-field: Otsu on HSV saturation separates stained tissue from white glass; a plain Otsu
also keeps pen marks, which are even more saturated, so ink hues (green/blue, far from H&E's
pink–purple) and near-black pixels are dropped before thresholding.
Fluorescence (DAPI, multiplex IF): the background is dark and tissue is signal above it, in
any channel, so the rule is Otsu on the per-pixel channel maximum, floored a few noise levels
above the background. ``mode="auto"`` tells the two apart by how much of the thumbnail is dark.
Holes are filled only when they do not touch the image border: glass reaching the edge of the
scan is background, not a hole in the tissue.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_objects

from slidefm.wsi.modes import TISSUE_MODES


@dataclasses.dataclass(frozen=True)
class TissueConfig:
    """Tissue-mask options. Areas are in µm² so they mean the same at any thumbnail scale."""

    mode: str = "auto"  # auto | brightfield | fluorescence (see ``detect_modality``)

    min_saturation: float = 0.07  # floor on the Otsu threshold: faint glass never counts as tissue
    max_value_dark: float = 0.15  # HSV value below this is pen/black artefact, not tissue
    exclude_pen: bool = True  # drop green/blue ink hues
    pen_hue_range: tuple[float, float] = (0.20, 0.70)  # HSV hue (0–1) of green…blue ink
    pen_min_saturation: float = 0.25
    close_um: float = 32.0  # closing radius, µm
    open_um: float = 16.0  # opening radius, µm
    min_object_um2: float = 50_000.0  # drop specks smaller than this
    max_hole_um2: float = 200_000.0  # fill holes smaller than this
    thumb_mpp: float = 8.0  # thumbnail resolution, µm/px (bounded by max size below)
    thumb_max_size: int = 4096
    dark_value: float = 0.2  # channel max below this is "dark" (fluorescence background)
    fluorescence_dark_fraction: float = 0.5  # auto: ≥ this fraction of dark pixels → fluorescence
    fluorescence_min_signal: float = 0.04  # floor on the signal threshold above background

    def __post_init__(self) -> None:
        if self.mode not in TISSUE_MODES:
            raise ValueError(
                f"tissue mode must be one of {', '.join(TISSUE_MODES)}, got {self.mode!r}"
            )


def detect_modality(rgb: np.ndarray, cfg: TissueConfig = TissueConfig()) -> str:
    """``"fluorescence"`` or ``"brightfield"`` for an RGB thumbnail (h, w, 3) uint8.

    Bright-field glass is near white, so even a slide full of tissue has few dark pixels
    (H&E nuclei are dark purple, not black); a fluorescence slide is mostly dark background.
    """
    if cfg.mode != "auto":
        return cfg.mode
    dark = (rgb.max(axis=-1) / 255.0) < cfg.dark_value
    return "fluorescence" if dark.mean() >= cfg.fluorescence_dark_fraction else "brightfield"


def tissue_mask(
    rgb: np.ndarray, thumb_mpp: float, cfg: TissueConfig = TissueConfig()
) -> np.ndarray:
    """Boolean tissue mask (h, w) for an RGB thumbnail (h, w, 3) uint8 at ``thumb_mpp`` µm/px.

    The rule follows ``detect_modality(rgb, cfg)`` (bright-field or fluorescence).
    """
    if detect_modality(rgb, cfg) == "fluorescence":
        mask = _fluorescence_foreground(rgb, cfg)
    else:
        mask = _brightfield_foreground(rgb, cfg)
    if mask is None:
        return np.zeros(rgb.shape[:2], dtype=bool)
    return _clean(mask, thumb_mpp, cfg)


def _fluorescence_foreground(rgb: np.ndarray, cfg: TissueConfig) -> np.ndarray | None:
    """Signal above a dark background: Otsu on the channel maximum, floored above the noise."""
    inten = rgb.max(axis=-1).astype(np.float64) / 255.0
    if np.ptp(inten) == 0:
        return None
    bg = float(np.median(inten[inten < cfg.dark_value])) if (inten < cfg.dark_value).any() else 0.0
    noise = float(np.median(np.abs(inten - bg)))
    thr = max(float(threshold_otsu(inten)), bg + 3 * noise, bg + cfg.fluorescence_min_signal)
    return inten > thr


def _brightfield_foreground(rgb: np.ndarray, cfg: TissueConfig) -> np.ndarray | None:
    """Stain saturation above glass (Otsu, floored), pen ink and black artefacts removed."""
    hsv = rgb2hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    candidate = val >= cfg.max_value_dark
    if cfg.exclude_pen:
        lo, hi = cfg.pen_hue_range
        pen = (hue >= lo) & (hue <= hi) & (sat >= cfg.pen_min_saturation)
        candidate &= ~pen
    vals = sat[candidate]
    if vals.size == 0 or np.ptp(vals) == 0:
        return None
    thr = max(float(threshold_otsu(vals)), cfg.min_saturation)
    return candidate & (sat > thr)


def _clean(mask: np.ndarray, thumb_mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Closing, opening, small objects removed, interior holes (not touching the border) filled."""
    px_area = thumb_mpp**2
    r_close = max(0, round(cfg.close_um / thumb_mpp))
    r_open = max(0, round(cfg.open_um / thumb_mpp))
    if r_close:
        mask = ndimage.binary_closing(np.pad(mask, r_close), disk(r_close))[
            r_close:-r_close, r_close:-r_close
        ]
    if r_open:
        mask = ndimage.binary_opening(mask, disk(r_open))
    mask = remove_small_objects(mask, max_size=max(1, int(cfg.min_object_um2 / px_area)))
    return fill_interior_holes(mask, max(1, int(cfg.max_hole_um2 / px_area)))


def fill_interior_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` with background components of ≤ ``max_size`` px filled, except those touching
    the image border (glass at the edge of the scan is background, not a hole)."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes <= max_size
    fill[0] = False
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill[border] = False
    return mask | fill[labels]


def slide_tissue_mask(
    reader: Any, cfg: TissueConfig = TissueConfig()
) -> tuple[np.ndarray, np.ndarray, float]:
    """Thumbnail (h, w, 3) at about ``cfg.thumb_mpp`` µm/px (≤ ``thumb_max_size``), its tissue
    mask (h, w) bool and the scale (level-0 px per thumbnail px) of an open ``SlideReader``.
    The one way encode-slides, the viewer and online patching find tissue on a whole slide."""
    level0_mpp = reader.mpp
    full_mpp_side = max(reader.info.width, reader.info.height) * level0_mpp
    thumb, scale = reader.thumbnail(
        max(64, min(cfg.thumb_max_size, round(full_mpp_side / cfg.thumb_mpp)))
    )
    return thumb, tissue_mask(thumb, scale * level0_mpp, cfg), scale


def area_fraction(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box covered by ``mask``.

    mask: (h, w) bool; boxes: (N, 4) float (x0, y0, x1, y1) in mask pixels, half-open.
    Uses an integral image with fractional-pixel box edges snapped to the nearest pixel.
    """
    h, w = mask.shape
    integ = np.zeros((h + 1, w + 1), dtype=np.float64)
    integ[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    b = np.rint(boxes).astype(np.int64)
    x0, y0 = np.clip(b[:, 0], 0, w), np.clip(b[:, 1], 0, h)
    x1, y1 = np.clip(b[:, 2], 0, w), np.clip(b[:, 3], 0, h)
    inside = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
    full = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1)
    return (inside / full).astype(np.float32)
