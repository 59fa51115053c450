"""Test helper: write small random tile-feature bags in the slidefm feature-file schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slidefm.io.features import SlideFeatures, write_features


def random_grid(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """(n, 2) distinct random (col, row) cells of a side × side grid."""
    cells = rng.choice(side * side, size=n, replace=False)
    return np.stack([cells % side, cells // side], axis=1).astype(np.int32)


def write_random_bags(
    folder: Path, num: int = 6, dim: int = 8, n_range=(20, 60), side: int = 12, seed: int = 0
) -> list[str]:
    """``num`` feature files ``bag<i>.h5`` with random features and random grids; their ids."""
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(num):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        grid = random_grid(rng, n, side)
        sf = SlideFeatures(
            slide_id=f"bag{i}",
            features=rng.normal(size=(n, dim)).astype(np.float32),
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
