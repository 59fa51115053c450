"""Cell layouts of synthetic slides: which tissue type fills each 256×256-px cell.

A slide is a grid of cells aligned to the tiler's lattice (level-0 origin, 256 px at 0.5 µm/px),
each cell of one type, so every tissue tile has exactly one known type. The layout alone
carries the planted labels:

- ``biomarker_spatial``: a *base* layout (tissue blob, tumour mass, necrosis, rare cells and the
  NUMBER of immune cells) is drawn without looking at the label; only then does the label
  decide WHERE the immune cells go: next to the tumour mass (positive) or at Chebyshev
  distance ≥ 2 from it, i.e. separated by stroma (negative). Bases are kept only if both
  placements are possible, so per-slide cell-type counts have the same distribution in both
  classes and only the arrangement differs.
- ``biomarker_bag``: fraction of tumour cells drawn with the rare (signet-ring-like) pattern:
  15–30 % when positive, 0–4 % when negative.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Cell-type codes of a layout; the order is part of the file format of cells.csv.
BACKGROUND, TUMOUR, STROMA, NECROSIS, IMMUNE, RARE = 0, 1, 2, 3, 4, 5
CELL_TYPES = ("background", "tumour", "stroma", "necrosis", "immune", "rare")

# Fractions drawn per slide (uniform ranges), independent of every label.
TISSUE_FRACTION = (0.55, 0.65)  # of all cells (the outer ring of cells is always glass)
MASS_FRACTION = (0.25, 0.35)  # tumour + necrosis + rare, of tissue cells
IMMUNE_FRACTION = (0.08, 0.14)  # of tissue cells
NECROSIS_FRACTION = (0.0, 0.15)  # of the tumour mass
RARE_POSITIVE = (0.15, 0.30)  # of tumour (+rare) cells when biomarker_bag = 1
RARE_NEGATIVE = (0.0, 0.04)  # … when biomarker_bag = 0
_KING = np.ones((3, 3), dtype=bool)  # 8-neighbourhood


def _tissue_blob(rng: np.random.Generator, rows: int, cols: int, n_tissue: int) -> np.ndarray:
    """Boolean (rows, cols): the ``n_tissue`` cells with the highest smooth-noise + centre score,
    never on the outer ring, with enclosed glass filled in.

    The glass must form ONE region around the tissue: a tissue detector fills small enclosed
    holes (and small glass pockets cut off by the slide border), which would turn glass cells
    into "tissue" tiles.
    """
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2 + rng.uniform(-1, 1), (cols - 1) / 2 + rng.uniform(-1, 1)
    ay, ax = rng.uniform(0.8, 1.25, size=2)
    radial = -np.hypot((y - cy) / (rows * ay), (x - cx) / (cols * ax))
    noise = ndimage.gaussian_filter(rng.normal(size=(rows, cols)), 1.5, mode="wrap")
    score = radial + 0.25 * noise / (noise.std() + 1e-9) * radial.std()
    score[[0, -1], :] = -np.inf
    score[:, [0, -1]] = -np.inf
    n_tissue = min(n_tissue, (rows - 2) * (cols - 2))
    order = np.argsort(-score, axis=None, kind="stable")
    tissue = np.zeros(rows * cols, dtype=bool)
    tissue[order[:n_tissue]] = True
    return ndimage.binary_fill_holes(tissue.reshape(rows, cols))


def _chebyshev_distance(mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance (in cells) from every cell to the nearest True cell of ``mask``."""
    return ndimage.distance_transform_cdt(~mask, metric="chessboard")


def _base_layout(rng: np.random.Generator, rows: int, cols: int, bag: int):
    """Label-free part of a layout, or None when the immune placement would be impossible.

    Returns (layout without immune cells, n_immune, distance-to-mass of every cell).
    """
    n_cells = rows * cols
    n_tissue = int(round(rng.uniform(*TISSUE_FRACTION) * n_cells))
    n_mass = max(2, int(round(rng.uniform(*MASS_FRACTION) * n_tissue)))
    n_immune = max(1, int(round(rng.uniform(*IMMUNE_FRACTION) * n_tissue)))
    n_necrosis = int(round(rng.uniform(*NECROSIS_FRACTION) * n_mass))
    tissue = _tissue_blob(rng, rows, cols, n_tissue)

    # Tumour mass: tissue cells closest to a random seed (jittered distance: ragged, compact).
    ty, tx = np.nonzero(tissue)
    s = rng.integers(len(ty))
    y, x = np.mgrid[0:rows, 0:cols]
    d = np.hypot(y - ty[s], x - tx[s]) + rng.uniform(0, 0.9, size=(rows, cols))
    d[~tissue] = np.inf
    mass_idx = np.argsort(d, axis=None, kind="stable")[:n_mass]
    mass = np.zeros(n_cells, dtype=bool)
    mass[mass_idx] = True
    mass = mass.reshape(rows, cols)

    layout = np.where(tissue, STROMA, BACKGROUND).astype(np.int8)
    layout[mass] = TUMOUR
    # Necrosis: the mass cells farthest from its edge (central necrosis).
    inner = ndimage.distance_transform_edt(np.pad(mass, 1))[1:-1, 1:-1]
    inner = inner + rng.uniform(0, 0.5, size=inner.shape)
    inner[~mass] = -1
    nec = np.argsort(-inner, axis=None, kind="stable")[:n_necrosis]
    layout.flat[nec] = NECROSIS
    # Rare pattern on a random subset of the viable tumour cells.
    viable = np.flatnonzero(layout.ravel() == TUMOUR)
    frac = rng.uniform(*(RARE_POSITIVE if bag else RARE_NEGATIVE))
    n_rare = int(round(frac * len(viable)))
    if bag:
        n_rare = max(n_rare, 2)
    layout.flat[rng.permutation(viable)[:n_rare]] = RARE

    dist = _chebyshev_distance(mass)
    free = (layout == STROMA).ravel()
    n_far = int(np.sum(free & (dist.ravel() >= 2)))
    if n_far < n_immune:  # (the near placement is always possible: free ≥ far)
        return None
    return layout, n_immune, dist


def slide_layout(
    rng: np.random.Generator, spatial: int, bag: int, rows: int = 12, cols: int = 12
) -> np.ndarray:
    """Cell-type layout (rows, cols) int8 of one slide with the given biomarker labels.

    Draws base layouts until one admits both immune placements (see module doc), then puts
    ``n_immune`` immune cells on the stroma cells nearest the tumour mass when ``spatial`` is 1
    (random cells of the ring touching it, 8-neighbourhood; the next ring only if that ring is
    too small, which happens on grids larger than about 20 cells), or on the stroma cells
    farthest from it (distance ≥ 2) when 0.
    """
    if rows < 6 or cols < 6:
        raise ValueError(f"a synthetic slide needs at least 6×6 cells, got {rows}×{cols}")
    for _ in range(1000):
        base = _base_layout(rng, rows, cols, bag)
        if base is not None:
            break
    else:  # pragma: no cover - the ranges above make this practically impossible
        raise RuntimeError(f"no feasible layout on a {rows}×{cols} grid; use more --cells")
    layout, n_immune, dist = base
    free = np.flatnonzero(layout.ravel() == STROMA)
    dfree = dist.ravel()[free]
    # Nearest (positive) or farthest (negative) first, ties broken at random.
    key = (dfree if spatial else -dfree) + rng.uniform(0, 0.99, size=len(free))
    pick = free[np.argsort(key, kind="stable")[:n_immune]]
    layout.flat[pick] = IMMUNE
    return layout


def cell_counts(layout: np.ndarray) -> np.ndarray:
    """Number of cells of each type, (len(CELL_TYPES),) int64."""
    return np.bincount(layout.ravel().astype(np.int64), minlength=len(CELL_TYPES))


def immune_tumour_contacts(layout: np.ndarray) -> int:
    """Number of immune cells with a tumour, rare or necrosis cell among their 8 neighbours."""
    mass = np.isin(layout, (TUMOUR, RARE, NECROSIS))
    near = ndimage.binary_dilation(mass, structure=_KING)
    return int(np.sum(near & (layout == IMMUNE)))
