"""Procedural H&E-like pixels for a synthetic slide's cell layout.

Every cell is drawn as two stain-concentration maps, haematoxylin (H, nuclei: blue-purple) and
eosin (E, cytoplasm/stroma: pink), then turned into RGB by Beer–Lambert with the slide's stain
vectors: ``rgb = white · exp(−(H·h + E·e))``. Sites differ in stain vectors and strengths and
every slide gets its own jitter, so neither a class nor a label is readable from colour alone.

Textures are vectorised over all cells of one type (stacks of shape (k, P, P), P = cell edge in
level-0 px at 0.5 µm/px). Nuclei come from a jittered lattice: every pixel looks up the seed of
its lattice cell, so positions, sizes and orientations vary from cell to cell at O(pixels) cost.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
from skimage.draw import disk

from slidefm.wsi.synthetic_layout import BACKGROUND, IMMUNE, NECROSIS, RARE, STROMA, TUMOUR

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class Stain:
    """Stain of one slide: unit optical-density vectors (RGB), strengths, and glass colour."""

    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_scale: float
    e_scale: float
    white: tuple[float, float, float]


# Simulated sites (labs/scanners): standard, haematoxylin-heavy purple, faded pink, cool scanner.
# Haematoxylin absorbs green more than red in all of them (purple, not pen-ink blue), and every
# nucleus sits in some eosin, as in real H&E.
SITES: dict[str, Stain] = {
    "site_1": Stain((0.63, 0.72, 0.29), (0.07, 0.99, 0.11), 1.00, 1.00, (244, 243, 241)),
    "site_2": Stain((0.55, 0.75, 0.36), (0.16, 0.95, 0.26), 1.30, 0.85, (238, 236, 240)),
    "site_3": Stain((0.60, 0.72, 0.30), (0.04, 0.90, 0.32), 0.85, 1.25, (246, 242, 240)),
    "site_4": Stain((0.62, 0.74, 0.26), (0.12, 0.86, 0.05), 1.05, 0.95, (238, 240, 243)),
}


def jitter_stain(site: Stain, rng: np.random.Generator) -> Stain:
    """Per-slide variation around a site: OD vectors perturbed, strengths ±20 %, brightness.

    Haematoxylin keeps its green absorption above its red one, so nuclei stay blue-PURPLE: a
    pure-blue hue would read as pen ink to a tissue detector (and to a pathologist).
    """

    def unit(v: np.ndarray) -> tuple[float, float, float]:
        v = np.clip(v, 0.01, None)
        return tuple(float(a) for a in v / np.linalg.norm(v))

    h = np.array(site.h_vec) + rng.normal(0, 0.04, 3)
    h[1] = max(h[1], h[0] + 0.07)
    b = rng.uniform(0.96, 1.02)
    return Stain(
        unit(h),
        unit(np.array(site.e_vec) + rng.normal(0, 0.05, 3)),
        site.h_scale * rng.uniform(0.8, 1.2),
        site.e_scale * rng.uniform(0.8, 1.2),
        tuple(float(min(255.0, w * b)) for w in site.white),
    )


# ---------------------------------------------------------------------------------------------
# primitives on (k, P, P) stacks


def _coords(k: int, p: int, angle: np.ndarray | None = None):
    """Pixel coordinates (u, v) of k cells, each rotated by its ``angle`` (k,) radians."""
    y, x = np.mgrid[0:p, 0:p].astype(F32)
    if angle is None:
        return np.broadcast_to(x, (k, p, p)), np.broadcast_to(y, (k, p, p))
    c, s = np.cos(angle).astype(F32)[:, None, None], np.sin(angle).astype(F32)[:, None, None]
    return x * c + y * s, -x * s + y * c


def _lattice(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    su: float,
    sv: float,
    jitter: tuple[float, float] = (0.2, 0.2),
):
    """Jittered lattice of spacing (su, sv) px over coordinates (u, v) of shape (k, P, P).

    Each lattice cell has one seed at its centre ± ``jitter`` × spacing. Returns (du, dv, seed):
    offsets of each pixel from its lattice cell's seed, and the seed's flat id (index into
    per-seed parameter arrays of length ``seed.max() + 1``).
    """
    k = u.shape[0]
    fu, fv = u / F32(su), v / F32(sv)
    gu, gv = np.floor(fu), np.floor(fv)
    fu -= gu  # position inside the lattice cell, [0, 1)
    fv -= gv
    gu, gv = gu.astype(np.int32), gv.astype(np.int32)
    gu -= gu.min()
    gv -= gv.min()
    nu, nv = int(gu.max()) + 1, int(gv.max()) + 1
    seed = (np.arange(k, dtype=np.int32)[:, None, None] * nu + gu) * nv + gv
    n = k * nu * nv
    ou = (0.5 + rng.uniform(-jitter[0], jitter[0], n)).astype(F32)
    ov = (0.5 + rng.uniform(-jitter[1], jitter[1], n)).astype(F32)
    return (fu - ou[seed]) * F32(su), (fv - ov[seed]) * F32(sv), seed


def _fit(spacing: float, extent: float) -> float:
    """Seed jitter (fraction of the spacing) that keeps an object of half-size ``extent`` px
    inside its lattice cell, within [0.05, 0.3]."""
    return float(np.clip(0.5 - extent / spacing, 0.05, 0.3))


def _soft(x: np.ndarray, edge: float = 1.2) -> np.ndarray:
    """Soft step: 1 where x >> 0, 0 where x << 0, over about ``edge`` px."""
    x = x * F32(1 / edge) + F32(0.5)
    return np.clip(x, 0.0, 1.0, out=x)


def _nuclei(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    spacing: tuple[float, float],
    radius: tuple[float, float],
    present: float,
    aspect: tuple[float, float] = (1.0, 1.0),
    tilt: float = np.pi,
) -> np.ndarray:
    """Soft nucleus mask (k, P, P) in [0, 1]: one ellipse per lattice seed, kept with prob.
    ``present``; minor semi-axis ``radius`` (px) and ``aspect`` drawn per nucleus; long axis
    within ±``tilt`` radians of the u axis."""
    su, sv = spacing
    major = radius[1] * (aspect[1] if tilt < 0.5 else 1.0)
    du, dv, seed = _lattice(rng, u, v, su, sv, (_fit(su, major), _fit(sv, radius[1])))
    n = int(seed.max()) + 1
    r = rng.uniform(*radius, n).astype(F32)
    inv_a = (1 / rng.uniform(*aspect, n)).astype(F32)
    th = rng.uniform(-tilt, tilt, n).astype(F32)
    keep = (rng.random(n) < present).astype(F32)
    c, s = np.cos(th)[seed], np.sin(th)[seed]
    pu = (du * c + dv * s) * inv_a[seed]
    pv = dv * c - du * s
    d = np.sqrt(pu * pu + pv * pv)
    return _soft(r[seed] - d) * keep[seed]


def _smooth(rng: np.random.Generator, k: int, p: int, grid: int = 6) -> np.ndarray:
    """Smooth random field (k, P, P), zero mean, unit variance at the knots, features about
    P/grid px: bilinear interpolation of a (grid+1)² normal lattice, as two matrix products."""
    g = rng.standard_normal((k, grid + 1, grid + 1)).astype(F32)
    t = np.linspace(0, grid, p, dtype=F32)
    a = np.clip(1 - np.abs(t[:, None] - np.arange(grid + 1, dtype=F32)[None]), 0, None)
    return a @ g @ a.T


# ---------------------------------------------------------------------------------------------
# tissue types → (H, E) stacks


def _stroma(rng, k, p):
    """Wavy pink collagen fibres with sparse thin fibroblast nuclei."""
    ang = rng.uniform(0, np.pi, k)
    u, v = _coords(k, p, ang)
    warp = 10 * _smooth(rng, k, p, 3)
    fib = np.sin((v + warp) * F32(2 * np.pi / rng.uniform(7, 11)))
    e = 0.49 + 0.11 * fib + 0.06 * _smooth(rng, k, p)
    nuc = _nuclei(rng, u, v, (34, 18), (2.0, 3.0), 0.35, (3.0, 4.5), 0.2)
    return 0.05 + 0.75 * nuc, e * (1 - 0.5 * nuc)


def _immune(rng, k, p):
    """Dense small round very dark lymphocyte nuclei on a pale pink background."""
    u, v = _coords(k, p)
    nuc = _nuclei(rng, u, v, (10, 10), (3.3, 4.3), 0.85, (1.0, 1.15))
    return 0.10 + 1.25 * nuc, 0.32 + 0.05 * _smooth(rng, k, p) - 0.05 * nuc


def _necrosis(rng, k, p):
    """Mottled eosinophilic debris with nuclear dust and pale ghost nuclei."""
    u, v = _coords(k, p)
    debris = _nuclei(rng, u, v, (8, 8), (0.8, 2.2), 0.35, (1.0, 2.5))
    ghosts = _nuclei(rng, u, v, (16, 16), (4.0, 6.0), 0.5)
    return 0.08 + 0.7 * debris + 0.12 * ghosts, 0.50 + 0.12 * _smooth(rng, k, p, 10)


def _rare(rng, k, p):
    """Signet-ring-like cells: a clear vacuole with a crescent nucleus pushed to its rim."""
    u, v = _coords(k, p)
    du, dv, seed = _lattice(rng, u, v, 30, 30, (0.12, 0.12))
    n = int(seed.max()) + 1
    rv = rng.uniform(8.0, 10.5, n).astype(F32)[seed]
    phi = rng.uniform(0, 2 * np.pi, n).astype(F32)
    vac = _soft(rv - np.sqrt(du * du + dv * dv))
    nd = np.hypot(du - rv * np.cos(phi)[seed], dv - rv * np.sin(phi)[seed])
    nuc = _soft(4.0 - nd) * (1 - vac)
    e = (0.45 + 0.05 * _smooth(rng, k, p)) * (1 - 0.9 * vac)
    return 0.06 + 1.0 * nuc, e


def _small_cell(rng, k, p):
    """Solid sheets of crowded small dark oval nuclei with scant cytoplasm."""
    u, v = _coords(k, p)
    nuc = _nuclei(rng, u, v, (11, 11), (4.2, 5.2), 0.95, (1.1, 1.5))
    speck = rng.random((k, p, p), dtype=F32)
    return 0.15 + nuc * (0.75 + 0.25 * speck), 0.30 + 0.04 * _smooth(rng, k, p)


def _spindle(rng, k, p):
    """Fascicles of elongated nuclei aligned along one (slightly wavy) direction per cell."""
    ang = rng.uniform(0, np.pi, k)
    u, v = _coords(k, p, ang)
    v = v + 6 * _smooth(rng, k, p, 3)
    nuc = _nuclei(rng, u, v, (30, 9), (2.2, 3.0), 0.9, (3.5, 5.0), 0.08)
    e = 0.45 + 0.05 * np.sin(v * F32(2 * np.pi / 5.0))
    return 0.10 + 0.9 * nuc, e * (1 - 0.4 * nuc)


def _adeno(rng, k, p):
    """Back-to-back glands: rings of cuboidal epithelium around clear lumina, in thin stroma."""
    u, v = _coords(k, p)
    s = 88.0
    du, dv, seed = _lattice(rng, u, v, s, s, (0.07, 0.07))
    n = int(seed.max()) + 1
    radius = rng.uniform(26, 38, n).astype(F32)[seed]
    width = rng.uniform(11, 15, n).astype(F32)[seed]
    d = np.sqrt(du * du + dv * dv)
    ring = _soft(radius - d) * _soft(d - (radius - width))
    lumen = _soft(radius - width - d)
    nuc = _nuclei(rng, u, v, (9, 9), (2.8, 3.8), 0.9, (1.0, 1.4)) * ring
    stroma_e = 0.45 + 0.08 * np.sin((u + 8 * _smooth(rng, k, p, 3)) * F32(2 * np.pi / 9))
    outside = 1 - ring - lumen
    e = outside * stroma_e + ring * 0.42 * (1 - 0.3 * nuc) + lumen * 0.03
    h = 0.04 * outside + ring * (0.12 + 0.85 * nuc)
    return h, e


def _papillary(rng, k, p):
    """Branching fronds: fibrovascular cores lined by dark columnar nuclei, pale spaces between."""
    u, v = _coords(k, p)
    dist = np.full((k, p, p), np.inf, dtype=F32)
    segs = []
    for _ in range(2):  # two trunks across the cell, each with four side branches
        a0 = rng.uniform(0, 2 * np.pi, k)
        x0, y0 = rng.uniform(0.2 * p, 0.8 * p, k), rng.uniform(0.2 * p, 0.8 * p, k)
        for side in (1.0, -1.0):
            segs.append((x0, y0, x0 + side * p * np.cos(a0), y0 + side * p * np.sin(a0)))
        for _ in range(4):
            t = rng.uniform(-0.7, 0.7, k) * p
            bx, by = x0 + t * np.cos(a0), y0 + t * np.sin(a0)
            ab = a0 + rng.choice([-1, 1], k) * rng.uniform(0.5, 1.1, k)
            ln = rng.uniform(40, 100, k)
            segs.append((bx, by, bx + ln * np.cos(ab), by + ln * np.sin(ab)))
    for seg in segs:
        ax, ay, bx, by = (np.asarray(q, dtype=F32)[:, None, None] for q in seg)
        dx, dy = bx - ax, by - ay
        px, py = u - ax, v - ay
        t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
        px -= t * dx
        py -= t * dy
        np.minimum(dist, px * px + py * py, out=dist)
    dist = np.sqrt(dist)
    core_w = 6.0
    core = _soft(core_w - dist)
    lining = _soft(core_w + 10 - dist) * (1 - core)
    nuc = _nuclei(rng, u, v, (8, 8), (2.8, 3.6), 0.95, (1.3, 1.8)) * lining
    space = 1 - core - lining
    fluid = 0.30 + 0.06 * _smooth(rng, k, p, 4)  # pale proteinaceous fluid between fronds
    e = core * 0.60 + lining * 0.32 * (1 - 0.2 * nuc) + space * fluid
    h = core * 0.10 + lining * (0.12 + 0.95 * nuc) + space * 0.05
    return h, e


TUMOUR_DRAW = {
    "adenocarcinoma": _adeno,
    "small_cell": _small_cell,
    "spindle_cell": _spindle,
    "papillary": _papillary,
}
OTHER_DRAW = {STROMA: _stroma, NECROSIS: _necrosis, IMMUNE: _immune, RARE: _rare}

# Colour look-up: concentrations quantised on a grid, RGB computed once per slide.
_NQ = 160  # levels per stain
_H_MAX, _E_MAX = 2.0, 1.2  # concentration at the top level


def _stain_lut(stain: Stain) -> np.ndarray:
    """(NQ·NQ, 3) uint8 RGB for every (H level, E level) pair by Beer–Lambert."""
    h = np.linspace(0, _H_MAX, _NQ)[:, None, None] * stain.h_scale * np.array(stain.h_vec)
    e = np.linspace(0, _E_MAX, _NQ)[None, :, None] * stain.e_scale * np.array(stain.e_vec)
    rgb = np.array(stain.white) * np.exp(-(h + e))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)


def _pen_marks(rng: np.random.Generator, layout: np.ndarray, p: int) -> tuple[np.ndarray, tuple]:
    """Boolean (H, W) mask of 1–3 thick curved ink strokes on glass away from tissue cells,
    and the ink RGB colour (saturated blue, green or near-black).

    Allowed: glass farther than 5/8 of a cell (160 px = 80 µm at P = 256) from any tissue cell,
    so a tissue detector's morphological closing never bridges ink and tissue. Strokes start
    on allowed glass and are clipped to it.
    """
    rows, cols = layout.shape
    sub = p / 8  # px per fine-grid step
    fine = np.repeat(np.repeat(layout != BACKGROUND, 8, 0), 8, 1)
    far = ndimage.distance_transform_edt(~fine) > 5
    mask = np.zeros((rows * p, cols * p), dtype=bool)
    starts = np.argwhere(far)
    if len(starts) == 0:
        return mask, (0, 0, 0)
    for _ in range(rng.integers(1, 4)):
        start = (starts[rng.integers(len(starts))] + rng.random(2)) * sub
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(1.0, 3.0) * p
        bend = rng.normal(0, 0.8)
        radius = max(2.0, rng.uniform(0.03, 0.06) * p)
        for t in np.linspace(0, 1, max(8, int(length / radius))):
            a = ang + bend * t
            y, x = start + t * length * np.array([np.sin(a), np.cos(a)])
            rr, cc = disk((y, x), radius, shape=mask.shape)
            mask[rr, cc] = True
    yy = (np.arange(rows * p) // sub).astype(int)
    xx = (np.arange(cols * p) // sub).astype(int)
    colours = ((35, 60, 170), (30, 125, 70), (30, 30, 35))
    return mask & far[yy[:, None], xx[None, :]], colours[rng.integers(len(colours))]


def render_slide(
    layout: np.ndarray,
    subtype: str,
    stain: Stain,
    rng: np.random.Generator,
    cell_px: int = 256,
    pen: bool = False,
    chunk: int = 8,
) -> np.ndarray:
    """RGB image (rows·cell_px, cols·cell_px, 3) uint8 of a cell layout (rows, cols).

    Level-0 pixels at 0.5 µm/px; cell (r, c) covers y ∈ [r·P, (r+1)·P), x ∈ [c·P, (c+1)·P).
    Cells are drawn ``chunk`` at a time so the working arrays stay in cache.
    """
    if subtype not in TUMOUR_DRAW:
        raise ValueError(f"unknown subtype {subtype!r}; expected one of {tuple(TUMOUR_DRAW)}")
    rows, cols = layout.shape
    p = cell_px
    lut = _stain_lut(stain)
    out = np.empty((rows * p, cols * p, 3), dtype=np.uint8)
    out_cells = out.reshape(rows, p, cols, p, 3)  # view: [r, :, c, :] is cell (r, c)
    qh, qe = F32((_NQ - 1) / _H_MAX), F32((_NQ - 1) / _E_MAX)
    draws = {BACKGROUND: None, TUMOUR: TUMOUR_DRAW[subtype], **OTHER_DRAW}
    for code, draw in draws.items():
        rr, cc = np.nonzero(layout == code)
        for i in range(0, len(rr), chunk):
            r, c = rr[i : i + chunk], cc[i : i + chunk]
            k = len(r)
            if draw is None:
                h = e = np.zeros((k, p, p), dtype=F32)
                amp = F32(0.6)
            else:
                h, e = draw(rng, k, p)
                amp = F32(2.5)
            # Dithered quantisation: grain of ±amp/2 levels stands in for sensor/tissue noise.
            g = rng.random((2, k, p, p), dtype=F32) - F32(0.5)
            hq = np.clip(h * qh + amp * g[0] + F32(0.5), 0, _NQ - 1).astype(np.int32)
            eq = np.clip(e * qe + amp * g[1] + F32(0.5), 0, _NQ - 1).astype(np.int32)
            out_cells[r, :, c, :] = np.take(lut, hq * _NQ + eq, axis=0)
    if pen:
        mask, colour = _pen_marks(rng, layout, p)
        out[mask] = colour
    return out
