"""Cut tiles out of large region reads, in DataLoader worker processes.

TRIDENT/CLAM call ``read_region`` once per tile; here a worker reads a block of
``region_tiles × region_tiles`` lattice cells in one call at the best pyramid level and
resamples every tile from that in-memory region at the exact target µm/px.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from slidefm.wsi.reader import SlideReader
from slidefm.wsi.tiling import TileGrid


class TileRegionDataset(Dataset):
    """Item i = (tile indices (n,) int64, tiles (n, patch, patch, 3) uint8) of region i.

    Each worker opens its own ``SlideReader`` (OpenSlide handles are not fork-safe to share).
    ``tile_transform`` (e.g. stain normalisation) maps one (patch, patch, 3) uint8 tile to another.
    """

    def __init__(
        self,
        path: str | Path,
        tiles: TileGrid,
        level: int,
        level_downsample: float,
        region_tiles: int = 8,
        mpp_override: float | None = None,
        tile_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.path, self.tiles, self.level, self.ds = (
            str(path),
            tiles,
            level,
            float(level_downsample),
        )
        self.mpp_override, self.tile_transform = mpp_override, tile_transform
        block = tiles.grid // max(1, region_tiles)
        _, region_of_tile = np.unique(block, axis=0, return_inverse=True)
        order = np.argsort(region_of_tile.ravel(), kind="stable")
        bounds = np.flatnonzero(np.diff(region_of_tile.ravel()[order])) + 1
        self.regions = np.split(order, bounds)
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def _get_reader(self) -> SlideReader:
        if self._reader is None:
            self._reader = SlideReader(self.path, mpp_override=self.mpp_override)
        return self._reader

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.regions[i]
        coords = self.tiles.coords[idx]
        ext, ps, ds = self.tiles.extent_level0, self.tiles.patch_size, self.ds
        x0, y0 = coords.min(axis=0)
        x1, y1 = coords.max(axis=0) + ext
        lw, lh = math.ceil((x1 - x0) / ds) + 1, math.ceil((y1 - y0) / ds) + 1
        region = self._get_reader().read_region_image(int(x0), int(y0), self.level, lw, lh)
        out = np.empty((len(idx), ps, ps, 3), dtype=np.uint8)
        # When the read level is exactly at the target µm/px, tiles are plain crops.
        arr = np.asarray(region) if abs(ext / ds - ps) < 1e-6 and float(ds).is_integer() else None
        for j, (cx, cy) in enumerate(coords):
            bx, by = (cx - x0) / ds, (cy - y0) / ds
            if arr is not None:
                tile = arr[int(by) : int(by) + ps, int(bx) : int(bx) + ps]
            else:
                box = (bx, by, bx + ext / ds, by + ext / ds)
                tile = np.asarray(region.resize((ps, ps), Image.Resampling.BILINEAR, box=box))
            out[j] = self.tile_transform(tile) if self.tile_transform else tile
        return idx.astype(np.int64), out


def tile_loader(
    dataset: TileRegionDataset, num_workers: int = 2, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader yielding one region at a time, prefetched by ``num_workers`` processes."""
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context="fork"
        if num_workers > 0
        and torch.multiprocessing.get_start_method(allow_none=True) in (None, "fork")
        else None,
    )


def iter_tile_batches(loader: DataLoader, batch_size: int):
    """Re-batch region outputs into (indices (b,), tiles (b, p, p, 3) uint8 tensor) of ≤ ``batch_size``."""
    buf_idx: list[torch.Tensor] = []
    buf_tiles: list[torch.Tensor] = []
    n = 0
    for idx, tiles in loader:
        buf_idx.append(torch.as_tensor(idx))
        buf_tiles.append(torch.as_tensor(tiles))
        n += len(idx)
        while n >= batch_size:
            all_idx, all_tiles = torch.cat(buf_idx), torch.cat(buf_tiles)
            yield all_idx[:batch_size], all_tiles[:batch_size]
            buf_idx, buf_tiles = [all_idx[batch_size:]], [all_tiles[batch_size:]]
            n -= batch_size
    if n:
        yield torch.cat(buf_idx), torch.cat(buf_tiles)


def read_patch(
    reader: SlideReader, x: int, y: int, extent_level0: float, level: int, patch_size: int
) -> np.ndarray:
    """One (patch_size, patch_size, 3) uint8 patch whose top-left is level-0 (x, y) and whose
    side is ``extent_level0`` level-0 px, read at pyramid ``level`` and resampled (bilinear,
    fractional box) exactly as ``TileRegionDataset`` cuts its tiles."""
    ds = reader.info.level_downsamples[level]
    lw, lh = math.ceil(extent_level0 / ds) + 1, math.ceil(extent_level0 / ds) + 1
    region = reader.read_region_image(int(x), int(y), level, lw, lh)
    box = (0.0, 0.0, extent_level0 / ds, extent_level0 / ds)
    if abs(extent_level0 / ds - patch_size) < 1e-6:
        return np.asarray(region)[:patch_size, :patch_size].copy()
    return np.asarray(region.resize((patch_size, patch_size), Image.Resampling.BILINEAR, box=box))
