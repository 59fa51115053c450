"""Per-tile scores (attention or attribution) as a PNG over the slide thumbnail and as GeoJSON
that QuPath opens.

Coordinates: ``coords`` (N, 2) int64 level-0 pixel (x, y) of each tile's top-left corner and
``patch_size_level0`` (level-0 pixels per tile side) come straight from the feature file, so a
GeoJSON polygon is exactly the tile that was encoded. The thumbnail scale is level-0 pixels per
thumbnail pixel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from slidefm.io.atomic import atomic_path


def normalize_scores(scores: np.ndarray, mode: str = "rank") -> np.ndarray:
    """Scores → [0, 1] for display. ``rank``: percentile rank (CLAM's choice: attention is
    heavy-tailed, so min–max would show one hot tile); ``minmax``: linear."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    if mode == "rank":
        if s.size == 1:
            return np.ones(1)
        order = s.argsort(kind="stable").argsort(kind="stable")
        return order / (s.size - 1)
    if mode == "minmax":
        span = s.max() - s.min()
        return (s - s.min()) / span if span > 0 else np.zeros_like(s)
    raise ValueError(f"normalize mode must be 'rank' or 'minmax', not {mode!r}")


def tile_scores(
    model: nn.Module, features: torch.Tensor, grid: torch.Tensor, target: int | None = None
) -> tuple[np.ndarray, str, int]:
    """Score every tile of one bag (features [N, D], grid [N, 2]) → (scores [N], kind, class).

    Models that return ``attention`` (ABMIL) give their attention weights. Others (slide
    encoder, pooling, TransMIL) get gradient × input: Σ_d ∂logit_target/∂x_nd · x_nd, the
    first-order contribution of each tile to the target logit. ``target`` defaults to the
    predicted class.
    """
    model.eval()
    x = features.detach().float().unsqueeze(0).requires_grad_(True)
    g = grid.unsqueeze(0)
    pad = torch.zeros(1, x.shape[1], dtype=torch.bool, device=x.device)
    with torch.enable_grad():
        out = model(x, g, pad)
        logits = out["logits"][0]
        cls = int(logits.argmax()) if target is None else int(target)
        if "attention" in out:
            return out["attention"][0].detach().cpu().numpy().astype(np.float64), "attention", cls
        (grad,) = torch.autograd.grad(logits[cls], x)
    return (grad[0] * x[0]).sum(-1).detach().cpu().numpy().astype(np.float64), "grad_x_input", cls


def slide_thumbnail(path: str | Path, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """RGB thumbnail (h, w, 3) uint8 and its scale (level-0 px per thumbnail px)."""
    from slidefm.wsi.reader import SlideReader

    with SlideReader(path) as r:
        return r.thumbnail(max_size)


def score_canvas(
    shape: tuple[int, int],
    scale: float,
    coords: np.ndarray,
    patch_size_level0: float,
    values: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint tile values onto a (h, w) thumbnail grid → (mean value per pixel, covered mask).

    Overlapping tiles average. A tile covers thumbnail pixels [x/scale, (x+s)/scale).
    """
    h, w = shape
    acc = np.zeros((h, w))
    cnt = np.zeros((h, w))
    s = float(patch_size_level0)
    for (x, y), v in zip(np.asarray(coords, dtype=np.float64), values):
        x0, y0 = int(np.floor(x / scale)), int(np.floor(y / scale))
        x1, y1 = (
            max(x0 + 1, int(np.ceil((x + s) / scale))),
            max(y0 + 1, int(np.ceil((y + s) / scale))),
        )
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            acc[y0:y1, x0:x1] += v
            cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    return np.where(covered, acc / np.maximum(cnt, 1), 0.0), covered


def render_heatmap(
    thumbnail: np.ndarray,
    scale: float,
    coords: np.ndarray,
    patch_size_level0: float,
    values01: np.ndarray,
    alpha: float = 0.5,
    cmap: Any = "jet",
) -> Image.Image:
    """Blend ``cmap(value)`` over the thumbnail where tiles are: (1-α)·thumb + α·colour.
    ``values01``: (N,) in [0, 1] (see ``normalize_scores``). Pixels without tiles are unchanged.
    ``cmap``: a matplotlib colormap or its name."""
    import matplotlib

    thumb = np.asarray(thumbnail, dtype=np.float64)[..., :3]
    canvas, covered = score_canvas(thumb.shape[:2], scale, coords, patch_size_level0, values01)
    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    colour = cm(canvas)[..., :3] * 255.0
    out = np.where(covered[..., None], (1 - alpha) * thumb + alpha * colour, thumb)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def tiles_geojson(
    coords: np.ndarray,
    patch_size_level0: float,
    scores: np.ndarray,
    values01: np.ndarray | None = None,
    name: str = "attention",
    cmap: str = "jet",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with one square Polygon per tile, in level-0 pixels.

    Ring: (x, y), (x+s, y), (x+s, y+s), (x, y+s), (x, y) with s = ``patch_size_level0``.
    Properties follow QuPath's GeoJSON: ``objectType: detection`` (so Measurement Maps work),
    ``classification`` {name, color} coloured by the display value, ``measurements`` {name:
    score}; plus plain ``score``, ``score_display`` and ``tile_index`` for other tools.
    """
    import matplotlib

    s = float(patch_size_level0)
    scores = np.asarray(scores, dtype=np.float64)
    disp = normalize_scores(scores) if values01 is None else np.asarray(values01, dtype=np.float64)
    colours = (
        (np.asarray(matplotlib.colormaps[cmap](disp))[:, :3] * 255).round().astype(int)
        if len(disp)
        else np.zeros((0, 3), int)
    )
    features = []
    for i, ((x, y), v, d) in enumerate(
        zip(np.asarray(coords, dtype=np.int64).tolist(), scores, disp)
    ):
        x1, y1 = x + s, y + s
        x1 = int(x1) if float(x1).is_integer() else x1
        y1 = int(y1) if float(y1).is_integer() else y1
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name, "color": colours[i].tolist()},
                    "measurements": {name: float(v), f"{name} (display)": float(d)},
                    "score": float(v),
                    "score_display": float(d),
                    "tile_index": i,
                },
            }
        )
    fc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if extra:
        fc["properties"] = extra
    return fc


def write_geojson(fc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(fc))
    return path


def write_png(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path


def write_jpeg(img: Image.Image, path: str | Path, quality: int = 90) -> Path:
    """A photographic image (the plain thumbnail) as JPEG: ~10× smaller than PNG."""
    path = Path(path)
    with atomic_path(path) as tmp:
        img.convert("RGB").save(tmp, format="JPEG", quality=quality)
    return path


# -- the figure a reader sees ---------------------------------------------------------------
def display_range(scores: np.ndarray, mode: str) -> tuple[np.ndarray, float, float, bool]:
    """(values in [0, 1] to colour, colour-bar low, high, signed) for a display ``mode``:

    - ``rank``: percentile rank among the slide's tiles (0–100 on the bar);
    - ``raw``: the scores themselves, linear between their min and max, or ±max|score|
      around 0 when they take both signs (gradient × input), so 0 is the bar's middle;
    - ``minmax``: raw scores rescaled to [0, 1].
    """
    s = np.asarray(scores, dtype=np.float64)
    if mode == "rank":
        return normalize_scores(s, "rank"), 0.0, 100.0, False
    if mode == "minmax":
        return normalize_scores(s, "minmax"), 0.0, 1.0, False
    if mode != "raw":
        raise ValueError(f"normalize mode must be 'rank', 'raw' or 'minmax', not {mode!r}")
    if s.size == 0:
        return s, 0.0, 1.0, False
    signed = bool(s.min() < 0 < s.max())
    lo, hi = (-np.abs(s).max(), np.abs(s).max()) if signed else (s.min(), s.max())
    span = hi - lo
    return ((s - lo) / span if span > 0 else np.zeros_like(s)), float(lo), float(hi), signed


def _scale_bar_um(width_um: float) -> float:
    """A round bar length (1-2-5 × 10^k µm) of about a fifth of the image width."""
    target = width_um / 5
    k = 10 ** np.floor(np.log10(target))
    return float(max(m * k for m in (1, 2, 5) if m * k <= target))


def heatmap_figure(
    thumbnail: np.ndarray,
    scale: float,
    coords: np.ndarray,
    patch_size_level0: float,
    scores: np.ndarray,
    mode: str = "rank",
    title: str = "",
    score_label: str = "score",
    level0_mpp: float | None = None,
    note: str = "",
    cmap: str | None = None,
    alpha: float = 0.5,
    colors: int = 256,
    bins: int = 10,
) -> Image.Image:
    """The heatmap as a reader needs it: overlay (``render_heatmap``) at the thumbnail's own
    resolution, a colour bar that says what the colours mean and their range, a title (slide,
    model, predicted class and probability), a scale bar (with ``level0_mpp``) and a red note
    (e.g. random weights). Saved as a ``colors``-colour palette image: a fraction of the size
    of a true-colour PNG (2048 px: ~0.5 MB instead of ~3 MB), same look on screen. Colours
    come in ``bins`` steps (deciles of rank by default), drawn the same on the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    values01, lo, hi, signed = display_range(scores, mode)
    cmap = matplotlib.colormaps[cmap or ("coolwarm" if signed else "jet")].resampled(bins)
    overlay = render_heatmap(thumbnail, scale, coords, patch_size_level0, values01, alpha, cmap)
    h, w = overlay.height, overlay.width
    dpi = 100
    fig = plt.figure(figsize=(w / dpi + 1.6, h / dpi + 1.1), dpi=dpi)
    ax = fig.add_axes((0.2 / (w / dpi + 1.6), 0.45 / (h / dpi + 1.1), w / dpi / (w / dpi + 1.6),
                       h / dpi / (h / dpi + 1.1)))  # fmt: skip
    ax.imshow(np.asarray(overlay), interpolation="nearest")
    ax.set_axis_off()
    if level0_mpp:
        um_per_px = float(level0_mpp) * float(scale)
        bar = _scale_bar_um(w * um_per_px)
        px = bar / um_per_px
        x0, y0 = 0.04 * w, 0.96 * h
        ax.plot([x0, x0 + px], [y0, y0], color="black", lw=4, solid_capstyle="butt")
        label = f"{bar / 1000:g} mm" if bar >= 1000 else f"{bar:g} µm"
        ax.text(x0 + px / 2, y0 - 0.015 * h, label, ha="center", va="bottom", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})  # fmt: skip
    cax = fig.add_axes((1 - 1.25 / (w / dpi + 1.6), 0.45 / (h / dpi + 1.1), 0.18 / (w / dpi + 1.6),
                        h / dpi / (h / dpi + 1.1)))  # fmt: skip
    cb = fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap=cmap), cax=cax)
    cb.set_label(score_label, fontsize=9)
    cb.ax.tick_params(labelsize=8)
    if mode == "rank":
        cb.set_ticks([0, 25, 50, 75, 100])
        cb.set_ticklabels(["0 (lowest)", "25", "50", "75", "100 (highest)"])
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / (h / dpi + 1.1), va="top")
    if note:
        fig.text(0.5, 0.02 / (h / dpi + 1.1) + 0.005, note, ha="center", va="bottom",
                 fontsize=8, color="tab:red")  # fmt: skip
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    img = Image.fromarray(rgb)
    return img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
