"""Tile-feature bags for training: one slide's features + grid per item, padded into batches.

Randomness (crops, rotations, dropout, subsampling) comes from a generator seeded by
(seed, epoch, index), never from global state, so an item is the same whichever worker loads it
and a resumed run sees the same augmented batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from slidefm.io.features import SlideFeatures, check_cohort, read_attrs, read_features

log = logging.getLogger(__name__)
CropSpec = int | tuple[int, int] | None


# (features (N, D) float32, grid (N, 2) int64, level-0 coords (N, 2) int64 of each tile's
# top-left corner, patch side in level-0 px): what every bag consumer reads of one slide.
SlideArrays = tuple[np.ndarray, np.ndarray, np.ndarray, float]


def slide_arrays(sf: SlideFeatures) -> SlideArrays:
    """One slide's bag arrays (coords and patch size: what published encoders read)."""
    return (
        sf.features.astype(np.float32, copy=False),
        sf.grid.astype(np.int64),
        np.asarray(sf.coords, dtype=np.int64),
        float(sf.attrs.get("patch_size_level0") or 0),
    )


@dataclasses.dataclass
class Bags:
    """A cohort's bags (``SlideArrays`` per slide), held in memory when they fit in
    ``cache_gb`` (every fold and seed of a protocol run reuses them), else read from disk at
    each access. ``embeddings`` caches frozen slide-encoder outputs (N_slides, E) per encoder
    key (``eval.inference.frozen_embeddings``)."""

    paths: list[Path]
    dim: int
    attrs: dict[str, Any]
    cached: list[SlideArrays] | None = None
    embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def slide_ids(self) -> list[str]:
        return [p.stem for p in self.paths]

    def item(self, j: int) -> SlideArrays:
        """Slide ``j``'s arrays, from one read of its file when not cached."""
        if self.cached is not None:
            return self.cached[j]
        return slide_arrays(read_features(self.paths[j]))

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D) float32, grid (N, 2) int64) of slide ``j``."""
        features, grid, _, _ = self.item(j)
        return features, grid


def load_bags(paths: Sequence[Path], progress: bool = True, cache_gb: float = 8.0) -> Bags:
    """Check every feature file (tiles present, one tile encoder for the cohort) and load them
    into memory when their float32 size is under ``cache_gb``."""
    from tqdm import tqdm

    shapes = check_cohort(paths)
    first = read_attrs(paths[0])
    attrs = {k: first.get(k) for k in ("encoder", "encoder_weights", "target_mpp", "patch_size")}
    bags = Bags(list(paths), shapes[0][1], attrs)
    if sum(n * d for n, d in shapes) * 4 / 2**30 <= cache_gb:
        bar = tqdm(range(len(paths)), desc="reading features", unit="slide", disable=not progress)
        bags.cached = [bags.item(j) for j in bar]
    else:
        log.info("features exceed %.1f GB: reading them from disk at each access", cache_gb)
    return bags


def list_feature_files(feature_dir: str | Path) -> list[Path]:
    """Sorted ``*.h5`` files of a feature folder (hidden temporary files excluded)."""
    d = Path(feature_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"Feature folder {d} not found; run `slidefm encode-slides` first")
    files = sorted(p for p in d.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"No *.h5 feature files in {d}; run `slidefm encode-slides` first")
    return files


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item of one epoch: independent of worker and of load order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def random_grid_crop(grid: np.ndarray, size: CropSpec, rng: np.random.Generator) -> np.ndarray:
    """Indices of the tiles inside a random ``size × size``-cell window of the grid.

    grid: (N, 2) int (col, row). ``size`` is an int or a (min, max) range of window sides (cells),
    drawn uniformly. The window is placed so that a random tile lies inside it, hence it is
    never empty. A slide smaller than the window keeps all its tiles.
    Returns sorted int64 indices into the N tiles.
    """
    n = len(grid)
    if size is None or n == 0:
        return np.arange(n)
    lo, hi = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if lo < 1 or hi < lo:
        raise ValueError(f"crop size must be >= 1 and min <= max, got {size!r}")
    side = int(rng.integers(lo, hi + 1))
    anchor = grid[int(rng.integers(n))].astype(np.int64)
    # Window origin such that the anchor tile is at a uniformly random offset inside it.
    origin = anchor - rng.integers(0, side, size=2)
    inside = np.all((grid >= origin) & (grid < origin + side), axis=1)
    return np.flatnonzero(inside)


def rotate_flip_grid(grid: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate (col, row) positions by ``k`` × 90° and optionally mirror the columns.

    Distances between tiles are preserved, so a position-aware encoder sees the same tissue
    layout in another orientation. The result is shifted so its minimum is (0, 0).
    """
    g = np.asarray(grid, dtype=np.int64)
    c, r = g[:, 0], g[:, 1]
    for _ in range(k % 4):
        c, r = -r, c  # 90° rotation of the (col, row) plane
    if flip:
        c = -c
    out = np.stack([c, r], axis=1)
    return out - out.min(axis=0, keepdims=True) if len(out) else out


def feature_dropout(features: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Zero each feature value with probability ``p`` and rescale the rest by 1/(1-p)."""
    if p <= 0:
        return features
    keep = rng.random(features.shape) >= p
    return (features * keep / (1.0 - p)).astype(features.dtype, copy=False)


def subsample(n: int, max_tiles: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted random subset of ``max_tiles`` of ``n`` indices (all of them when n ≤ max_tiles)."""
    if max_tiles is None or n <= max_tiles:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_tiles, replace=False))


def _resolve_files(
    source: str | Path | Sequence[str | Path], slide_ids: Sequence[str] | None
) -> list[Path]:
    """Feature files of a folder (restricted to and ordered by ``slide_ids``) or a file list."""
    if isinstance(source, str | Path):
        files = list_feature_files(source)
        by_id = {p.stem: p for p in files}
        if slide_ids is not None:
            missing = [s for s in slide_ids if s not in by_id]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} slide(s) have no feature file in {source}: "
                    f"{', '.join(missing[:5])}; encode them or drop them from the manifest"
                )
            files = [by_id[s] for s in slide_ids]
    else:
        files = [Path(p) for p in source]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Feature file(s) not found: {', '.join(missing[:5])}")
    return files


class FeatureBagDataset(Dataset):
    """Slides as bags of tile features: item = {slide_id, features (N, D) float32,
    grid (N, 2) int64 (col, row), label (if labels were given)}.

    feature_dir_or_paths: a folder of ``<slide_id>.h5`` files, a list of files, or a cohort's
    ``Bags`` (its in-memory cache is shared; ``rows`` picks and orders its slides).
    slide_ids: restrict to (and order by) these slides. labels: a mapping slide_id → label or a
    sequence aligned with the slides. crop: window side(s) in grid cells (see
    ``random_grid_crop``). augment: random 90° rotations, flips and feature dropout.
    max_tiles: random subset per item. Call ``set_epoch`` to get new random draws per epoch.
    center_grid: shift an unaugmented grid so its minimum is (0, 0) (False: level-0 grid as
    stored, what MIL heads and heatmaps read).
    """

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_bags(items)

    def __init__(
        self,
        feature_dir_or_paths: str | Path | Sequence[str | Path] | Bags,
        slide_ids: Sequence[str] | None = None,
        labels: Mapping[str, Any] | Sequence[Any] | None = None,
        max_tiles: int | None = None,
        crop: CropSpec = None,
        augment: bool = False,
        seed: int = 0,
        cache: bool = True,
        dropout: float = 0.1,
        rows: Sequence[int] | None = None,
        center_grid: bool = True,
    ):
        self.store = feature_dir_or_paths if isinstance(feature_dir_or_paths, Bags) else None
        if self.store is not None:  # checked by load_bags
            self.rows = np.arange(len(self.store.paths)) if rows is None else np.asarray(rows)
            files = [self.store.paths[int(j)] for j in self.rows]
            slide_ids = [self.store.slide_ids[int(j)] for j in self.rows]
        else:
            files = _resolve_files(feature_dir_or_paths, slide_ids)
        if self.store is None:
            check_cohort(files)  # no empty files, one tile encoder; contents checked on read
        self.paths = files
        self.slide_ids = list(slide_ids) if slide_ids is not None else [p.stem for p in files]
        if len(self.slide_ids) != len(self.paths):
            raise ValueError(f"{len(self.slide_ids)} slide ids for {len(self.paths)} files")
        if labels is None:
            self.labels = None
        elif isinstance(labels, Mapping):
            missing = [s for s in self.slide_ids if s not in labels]
            if missing:
                raise ValueError(f"No label for slide(s): {', '.join(missing[:5])}")
            self.labels = [labels[s] for s in self.slide_ids]
        else:
            self.labels = list(labels)
            if len(self.labels) != len(self.paths):
                raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} slides")
        self.max_tiles = max_tiles
        self.crop = tuple(crop) if isinstance(crop, list) else crop
        self.augment = augment
        self.dropout = dropout
        self.center_grid = center_grid
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, SlideFeatures] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """New random crops/augmentations per epoch, reproducible from (seed, epoch, index)."""
        self.epoch = int(epoch)

    def slide(self, index: int) -> SlideFeatures:
        """The full, unaugmented slide (from the in-memory cache when enabled)."""
        sf = self._cache.get(index)
        if sf is None:
            sf = read_features(self.paths[index])
            if self.cache:
                self._cache[index] = sf
        return sf

    def _arrays(self, index: int) -> SlideArrays:
        """Item ``index``'s arrays, whole and unaugmented (one read of the file at most)."""
        if self.store is not None:
            return self.store.item(int(self.rows[index]))
        return slide_arrays(self.slide(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        features, grid, coords, patch_level0 = self._arrays(index)
        rng = item_rng(self.seed, self.epoch, index)
        idx = random_grid_crop(grid, self.crop, rng)
        idx = idx[subsample(len(idx), self.max_tiles, rng)]
        feats = np.asarray(features[idx], dtype=np.float32)
        grid = grid[idx]
        if self.augment:
            grid = rotate_flip_grid(grid, int(rng.integers(4)), bool(rng.integers(2)))
            feats = feature_dropout(feats, self.dropout, rng)
        elif len(grid) and self.center_grid:
            grid = grid - grid.min(axis=0, keepdims=True)
        item = {
            "slide_id": self.slide_ids[index],
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "grid": torch.from_numpy(np.ascontiguousarray(grid)),
            "coords": torch.from_numpy(np.ascontiguousarray(coords[idx])),
            "patch_size_level0": patch_level0,
        }
        if self.labels is not None:
            label = self.labels[index]
            item["label"] = label.tolist() if isinstance(label, np.ndarray | np.generic) else label
        return item


def bag_rows(
    bags: Bags, rows: np.ndarray, y: np.ndarray, max_tiles: int | None = None, seed: int = 0
) -> FeatureBagDataset:
    """Slides ``rows`` of a cohort with targets ``y[rows]`` (``y``: one per cohort slide), grid
    as stored: the MIL protocol's train / validation / test bags. ``max_tiles`` draws a random
    tile subset per (seed, epoch, item) — training augmentation and a memory cap; evaluation
    passes None and sees every tile."""
    rows = np.asarray(rows)
    return FeatureBagDataset(bags, labels=np.asarray(y)[rows], max_tiles=max_tiles, seed=seed,
                             rows=rows, center_grid=False)  # fmt: skip


def collate_bags(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad bags to the longest: features [B, Nmax, D] (0 on padding), grid [B, Nmax, 2] long,
    padding_mask [B, Nmax] bool (True = pad), slide_id list, label tensor when items have one;
    coords [B, Nmax, 2] long (level-0 px) and patch_size_level0 [B] float64 when items have them.
    """
    b = len(items)
    nmax = max(int(it["features"].shape[0]) for it in items)
    d = int(items[0]["features"].shape[1])
    feats = torch.zeros(b, nmax, d, dtype=items[0]["features"].dtype)
    grid = torch.zeros(b, nmax, 2, dtype=torch.long)
    pad = torch.ones(b, nmax, dtype=torch.bool)
    for i, it in enumerate(items):
        n = int(it["features"].shape[0])
        feats[i, :n] = it["features"]
        grid[i, :n] = it["grid"]
        pad[i, :n] = False
    out: dict[str, Any] = {
        "features": feats,
        "grid": grid,
        "padding_mask": pad,
        "slide_id": [it["slide_id"] for it in items],
    }
    if "coords" in items[0]:
        coords = torch.zeros(b, nmax, 2, dtype=torch.long)
        for i, it in enumerate(items):
            coords[i, : len(it["coords"])] = it["coords"]
        out["coords"] = coords
        sizes = [float(it["patch_size_level0"]) for it in items]
        out["patch_size_level0"] = torch.tensor(sizes, dtype=torch.float64)
    if "label" in items[0]:
        out["label"] = torch.as_tensor([it["label"] for it in items])
    return out
