"""Cut tiles out of large region reads, in DataLoader worker processes.

TRIDENT/CLAM call ``read_region`` once per tile; here a worker reads a block of
``region_tiles × region_tiles`` lattice cells in one call at the best pyramid level and
resamples every tile from that in-memory region at the exact target µm/px.

Resampling: antialiased bilinear with PIL's box geometry (output pixel i samples the source at
``box0 + (i + 0.5)·extent/patch − 0.5``). Tiles whose box starts on a whole region pixel (every
level-0 read: the lattice is integer) are resampled together in one uint8 ``F.interpolate``
call with that exact scale (torch's SIMD uint8 kernel, ≤ 1 grey level from PIL); tiles with a
fractional start (non-integer level downsamples) go through PIL's ``resize(box=…)``.
A small slide is cut into more, smaller regions so every worker gets some (``min_regions``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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
        min_regions: int = 1,
    ):
        self.path, self.tiles, self.level, self.ds = (
            str(path),
            tiles,
            level,
            float(level_downsample),
        )
        self.mpp_override, self.tile_transform = mpp_override, tile_transform
        self.regions = _split_regions(tiles.grid, max(1, region_tiles), max(1, min_regions))
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def _get_reader(self) -> SlideReader:
        if self._reader is None:  # the caller already checked the file's integrity
            self._reader = SlideReader(
                self.path, mpp_override=self.mpp_override, check_integrity=False
            )
        return self._reader

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.regions[i]
        coords = self.tiles.coords[idx]
        ext, ps, ds = self.tiles.extent_level0, self.tiles.patch_size, self.ds
        e = ext / ds  # tile side in region pixels
        margin = math.ceil(max(1.0, e / ps)) + 2  # filter support past the last box pixel
        x0, y0 = coords.min(axis=0)
        x1, y1 = coords.max(axis=0) + ext
        lw, lh = math.ceil((x1 - x0) / ds) + margin, math.ceil((y1 - y0) / ds) + margin
        region = self._get_reader().read_region_image(int(x0), int(y0), self.level, lw, lh)
        arr = np.asarray(region)
        bxy = (coords - [x0, y0]) / ds  # (n, 2) box origins in region pixels
        whole = np.all(np.abs(bxy - np.rint(bxy)) < 1e-6, axis=1)
        if abs(e - ps) < 1e-6:  # read level exactly at the target µm/px: plain crops
            out = None if not whole.all() else _crops(arr, np.rint(bxy).astype(int), ps)
        else:
            out = np.empty((len(idx), ps, ps, 3), dtype=np.uint8)
            if whole.any():
                out[whole] = _resample_whole(arr, np.rint(bxy[whole]).astype(int), e, ps, margin)
            for j in np.flatnonzero(~whole):
                bx, by = bxy[j]
                box = (bx, by, bx + e, by + e)
                out[j] = np.asarray(region.resize((ps, ps), Image.Resampling.BILINEAR, box=box))
        if out is None:  # exact scale but fractional origins (never on an integer lattice)
            out = np.empty((len(idx), ps, ps, 3), dtype=np.uint8)
            for j, (bx, by) in enumerate(bxy):
                box = (bx, by, bx + e, by + e)
                out[j] = np.asarray(region.resize((ps, ps), Image.Resampling.BILINEAR, box=box))
        if self.tile_transform:
            out = np.stack([self.tile_transform(t) for t in out])
        return idx.astype(np.int64), out


def _split_regions(grid: np.ndarray, region_tiles: int, min_regions: int) -> list[np.ndarray]:
    """Tile indices grouped by ``region_tiles``² lattice blocks, the block side shrunk (down to
    1) until there are at least ``min_regions`` groups."""
    r = region_tiles
    while True:
        _, region_of_tile = np.unique(grid // r, axis=0, return_inverse=True)
        region_of_tile = region_of_tile.ravel()
        if r == 1 or region_of_tile.max(initial=-1) + 1 >= min_regions:
            break
        r = max(1, r // 2)
    order = np.argsort(region_of_tile, kind="stable")
    bounds = np.flatnonzero(np.diff(region_of_tile[order])) + 1
    return np.split(order, bounds)


def _crops(arr: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) crops of ``arr`` (h, w, 3) at integer (x, y) ``origins`` (n, 2)."""
    return np.stack([arr[y : y + size, x : x + size] for x, y in origins])


def _resample_whole(
    arr: np.ndarray, origins: np.ndarray, extent: float, ps: int, margin: int
) -> np.ndarray:
    """Tiles of side ``extent`` region px at integer ``origins`` → (n, ps, ps, 3) uint8.

    Same geometry as ``PIL.Image.resize(box=(x, y, x + extent, y + extent))``: the scale is
    passed as-is (``recompute_scale_factor=False``), so the fractional extent is kept exactly.
    """
    m = math.ceil(extent) + margin
    crops = _crops(arr, origins, m)  # (n, m, m, 3): permuted below into a channels_last view
    x = torch.from_numpy(crops).permute(0, 3, 1, 2)
    y = F.interpolate(
        x,
        scale_factor=ps / extent,
        mode="bilinear",
        antialias=True,
        align_corners=False,
        recompute_scale_factor=False,
    )
    return y[:, :, :ps, :ps].permute(0, 2, 3, 1).numpy()


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
