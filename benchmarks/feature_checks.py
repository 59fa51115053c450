"""Cost of the feature-file checks on read (crc32 checksums + ``validate_features``): the same
file read with ``read_features`` (checked) and by a bare h5py read of the same datasets
(unchecked), side by side in one run, plus the crc32 throughput on its own.

    python benchmarks/feature_checks.py --tiles 50000 --dim 1536
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from slidefm.io.features import (
    SlideFeatures,
    checksum,
    grid_from_coords,
    read_features,
    write_features,
)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bare_read(path: Path) -> None:
    with h5py.File(path, "r") as f:
        _ = np.asarray(f["features"][()], dtype=np.float32)
        _ = f["coords"][()], f["grid"][()], f["tissue_fraction"][()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(a.tiles)))
    cells = np.arange(a.tiles)
    coords = np.stack([cells % side, cells // side], 1).astype(np.int64) * 256
    sf = SlideFeatures(
        "bench",
        rng.normal(size=(a.tiles, a.dim)).astype(a.dtype),
        coords,
        grid_from_coords(coords, 256),
        np.ones(a.tiles, np.float32),
        dict(
            encoder="bench",
            encoder_weights="random",
            target_mpp=0.5,
            patch_size=256,
            patch_size_level0=256,
            config_hash="b",
            seed=0,
        ),  # fmt: skip
    )
    with tempfile.TemporaryDirectory() as d:
        path = write_features(Path(d) / "bench.h5", sf)
        bare_read(path)  # warm the page cache for both
        checked = best_of(lambda: read_features(path), a.repeats)
        bare = best_of(lambda: bare_read(path), a.repeats)
        crc = best_of(lambda: checksum(sf.features), a.repeats)
        mb = sf.features.nbytes / 2**20
    print(
        json.dumps(
            {
                "tiles": a.tiles,
                "dim": a.dim,
                "dtype": a.dtype,
                "features_MiB": round(mb, 1),
                "read_features_checked_s": round(checked, 4),
                "bare_h5py_read_s": round(bare, 4),
                "checked_over_bare": round(checked / bare, 3),
                "crc32_MiB_per_s": round(mb / crc, 1),
                "machine": f"{platform.processor() or platform.machine()}, page cache warm",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
