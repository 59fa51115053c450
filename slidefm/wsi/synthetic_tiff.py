"""Write an RGB array as an Aperio-style pyramidal tiled TIFF that OpenSlide opens with µm/px.

Each pyramid level is its own tiled IFD (OpenSlide's Aperio reader lists tiled IFDs as levels;
levels stored as SubIFDs would be invisible to it). The first IFD's ImageDescription follows
the Aperio convention (``Aperio ...|MPP = 0.5|AppMag = 20``) so OpenSlide reports
``openslide.mpp-x/y``. No timestamps are written, so equal pixels give equal bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

TILE = 256  # TIFF tile edge, px (a multiple of 16 as TIFF requires)


def downsample2(rgb: np.ndarray) -> np.ndarray:
    """2×2 box-filter downsample of an (h, w, 3) uint8 image; odd edges are cropped."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    a = rgb[:h, :w].astype(np.uint16)
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


def pyramid(rgb: np.ndarray, min_levels: int = 3, min_side: int = 512) -> list[np.ndarray]:
    """Levels 0, 1, … at downsamples 1, 2, 4, …: at least ``min_levels``, then until the short
    side would drop below ``min_side`` px."""
    levels = [rgb]
    while len(levels) < min_levels or min(levels[-1].shape[:2]) // 2 >= min_side:
        if min(levels[-1].shape[:2]) < 2:
            break
        levels.append(downsample2(levels[-1]))
    return levels


def aperio_description(
    width: int, height: int, mpp: float, quality: int, compression: str, extra: str
) -> str:
    """Aperio ImageDescription: OpenSlide parses the ``key = value`` fields after the first '|'."""
    mag = 10.0 / mpp  # 0.5 µm/px ↔ 20× by the usual scanner convention (informative only)
    return (
        f"Aperio Image Library slidefm-synthetic\r\n{width}x{height} [0,0 {width}x{height}] "
        f"({TILE}x{TILE}) {compression.upper()}/RGB Q={quality}|AppMag = {mag:g}|MPP = {mpp:g}|{extra}"
    )


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float = 0.5,
    quality: int = 85,
    compression: str = "jpeg",
    extra_description: str = "Source = slidefm synth-cohort",
) -> None:
    """Write ``rgb`` (h, w, 3) uint8, level-0 at ``mpp`` µm/px, as a tiled pyramidal TIFF.

    ``compression``: "jpeg" (quality ``quality``, RGB colour space) or "deflate" (lossless).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    if compression not in ("jpeg", "deflate"):
        raise ValueError(f"compression must be 'jpeg' or 'deflate', not {compression!r}")
    h, w = rgb.shape[:2]
    desc = aperio_description(w, h, mpp, quality, compression, extra_description)
    args = {"level": quality} if compression == "jpeg" else {"level": 6}
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per cm, for readers that use resolution tags
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, level in enumerate(pyramid(rgb)):
            tw.write(
                level,
                photometric="rgb",
                tile=(TILE, TILE),
                compression=compression,
                compressionargs=args,
                description=desc if i == 0 else f"Aperio Image Library slidefm-synthetic level {i}",
                subfiletype=0 if i == 0 else 1,
                resolution=(res[0] / 2**i, res[1] / 2**i),
                resolutionunit="CENTIMETER",
                software=False,
                metadata=None,
            )
