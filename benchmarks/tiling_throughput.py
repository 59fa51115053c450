"""Tile reading throughput: region reads (slidefm) vs one ``openslide.read_region`` per tile
(TRIDENT/CLAM style), same slide, same tiles, same output size, measured side by side.

Prints JSON with tiles/s for each and their ratio, with 0 workers (pure reading cost) and with
the encode default of 2 DataLoader workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from slidefm.wsi.patches import TileRegionDataset, tile_loader
from slidefm.wsi.reader import SlideReader
from slidefm.wsi.tiling import make_tile_grid

REPO = Path(__file__).resolve().parent.parent


class PerTileDataset(Dataset):
    """The baseline: each tile is its own read_region call at the best level, then resized."""

    def __init__(self, path, tiles, level, ds):
        self.path, self.tiles, self.level, self.ds = str(path), tiles, level, ds
        self._s = None

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, i):
        if self._s is None:
            self._s = openslide.OpenSlide(self.path)
        x, y = self.tiles.coords[i]
        n = math.ceil(self.tiles.extent_level0 / self.ds)
        img = self._s.read_region((int(x), int(y)), self.level, (n, n)).convert("RGB")
        e = self.tiles.extent_level0 / self.ds
        ps = self.tiles.patch_size
        return np.asarray(img.resize((ps, ps), Image.Resampling.BILINEAR, box=(0, 0, e, e)))


def _time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(path: Path, target_mpp: float, patch: int, workers: int, repeats: int) -> dict:
    with SlideReader(path) as r:
        mask = np.ones((64, 64), bool)  # every tile: reading cost only, independent of tissue
        scale = max(r.info.width, r.info.height) / 64
        tiles = make_tile_grid(
            r.info.width, r.info.height, r.mpp, mask, scale, target_mpp, patch, 0, 0.0
        )
        level = r.best_level_for_mpp(target_mpp)
        ds = r.info.level_downsamples[level]
    # As encode-slides builds it: small slides are split so every worker gets regions.
    ours = TileRegionDataset(
        path, tiles, level, ds, region_tiles=8, min_regions=2 * max(1, workers)
    )
    base = PerTileDataset(path, tiles, level, ds)

    def run_ours():
        for _ in tile_loader(ours, workers):
            pass

    def run_base():
        kw = {"num_workers": workers, "prefetch_factor": 4} if workers else {}
        for _ in DataLoader(base, batch_size=None, **kw):
            pass

    t_ours, t_base = _time(run_ours, repeats), _time(run_base, repeats)
    n = len(tiles)
    return {
        "slide": path.name,
        "tiles": n,
        "read_level": level,
        "workers": workers,
        "slidefm_tiles_per_s": round(n / t_ours, 1),
        "per_tile_read_region_tiles_per_s": round(n / t_base, 1),
        "ratio": round(t_base / t_ours, 2),
        "regions": len(ours),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--slide", type=Path, default=REPO / "data" / "sample" / "CMU-1-Small-Region.svs"
    )
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    results = [bench(a.slide, a.target_mpp, a.patch_size, w, a.repeats) for w in (0, 2)]
    # The comparison: slidefm as encode runs it (2 workers) vs a plain per-tile loop.
    headline = round(
        results[1]["slidefm_tiles_per_s"] / results[0]["per_tile_read_region_tiles_per_s"], 2
    )
    print(
        json.dumps(
            {
                "benchmark": "tiling_throughput",
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpu",
                "results": results,
                "headline_slidefm_2_workers_vs_per_tile_loop": headline,
                "target_ratio": 2.0,
            },
            indent=2,
        )
    )
