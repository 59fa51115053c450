"""Test helper: write small random tile-feature bags in the slidefm feature-file schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slidefm.io.features import SlideFeatures, write_features


def random_grid(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """(n, 2) distinct random (col, row) cells of a side × side grid."""
    cells = rng.choice(side * side, size=n, replace=False)
    return np.stack([cells % side, cells // side], axis=1).astype(np.int32)


def smooth_features(rng: np.random.Generator, grid: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) features that vary smoothly over the grid (random low-frequency waves) plus a
    little noise: a hidden tile is predictable from its neighbours."""
    freq = rng.normal(scale=0.4, size=(2, dim))
    phase = rng.uniform(0, 2 * np.pi, size=dim)
    waves = np.sin(grid @ freq + phase)
    return (waves + 0.1 * rng.normal(size=waves.shape)).astype(np.float32)


def write_random_bags(
    folder: Path,
    num: int = 6,
    dim: int = 8,
    n_range=(20, 60),
    side: int = 12,
    seed: int = 0,
    smooth: bool = False,
) -> list[str]:
    """``num`` feature files ``bag<i>.h5`` with random (or spatially smooth) features and
    random grids; returns their slide ids."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(num):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        grid = random_grid(rng, n, side)
        feats = smooth_features(rng, grid, dim) if smooth else rng.normal(size=(n, dim))
        sf = SlideFeatures(
            slide_id=f"bag{i}",
            features=feats.astype(np.float32),
            coords=grid.astype(np.int64) * 256,
            grid=grid,
            tissue_fraction=np.ones(n, np.float32),
            attrs=dict(
                encoder="random",
                encoder_weights="random",
                target_mpp=0.5,
                patch_size=256,
                patch_size_level0=256,
                config_hash="test",
                seed=seed,
            ),
        )
        write_features(folder / f"bag{i}.h5", sf)
        ids.append(f"bag{i}")
    return ids
