"""Feature-file geometry shared with TRIDENT/CLAM (issue 17): the grid step of a foreign file
with overlap is the tile stride, and our ``coords`` attrs make TRIDENT's reader cut exactly
our tile. References: TRIDENT's own formulas (WSIPatcher: ``_colrow_to_xy`` for the lattice,
``patch_size_src = round(patch_size × src_mag / dst_mag)`` with mag = 10 / µm-per-px), written
out here by hand."""

from __future__ import annotations

import h5py
import numpy as np

from slidefm.cli import main
from slidefm.io.features import read_features


def _trident_lattice(cols, rows, patch_src, overlap_src):
    """TRIDENT's WSIPatcher._colrow_to_xy: x = col·P − O·max(col − 1, 0)."""

    def xy(c):
        return c * patch_src - overlap_src * max(c - 1, 0)

    return np.array([[xy(c), xy(r)] for c in range(cols) for r in range(rows)], np.int64)


def test_trident_overlap_file_keeps_one_tile_per_cell(tmp_path):
    # 40x scan (mag 40) → 20x, patch 256, overlap 128: P = 512, O = 256 level-0 px.
    patch, mag0, mag, overlap = 256, 40, 20, 128
    p_src, o_src = round(patch * mag0 / mag), round(overlap * mag0 / mag)
    coords = _trident_lattice(21, 9, p_src, o_src)  # 189 tiles
    path = tmp_path / "trident.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(len(coords), 8)).astype("f4")
        d = f.create_dataset("coords", data=coords)
        d.attrs.update(
            patch_size=patch,
            patch_size_level0=patch * mag0 // mag,
            level0_magnification=mag0,
            target_magnification=mag,
            overlap=overlap,
            name="trident",
        )
    sf = read_features(path)
    cells = {tuple(g) for g in sf.grid.tolist()}
    assert len(cells) == len(coords) == 189  # was 58 cells with the patch size as step
    # Neighbours on TRIDENT's lattice (cols ≥ 1 are a stride S = P − O apart) are one cell apart.
    order = np.lexsort((sf.coords[:, 1], sf.coords[:, 0]))
    xs = sorted({int(x) for x in sf.coords[:, 0] if x > 0})
    cols = {int(x): int(c) for (x, _), (c, _) in zip(sf.coords[order], sf.grid[order])}
    assert all(cols[b] - cols[a] == 1 for a, b in zip(xs, xs[1:]))
    assert sf.attrs["stride_level0"] == p_src - o_src


def test_coords_attrs_make_trident_cut_our_tile(sample_slide, tmp_path):
    argv = ["encode-slides", str(sample_slide), "--out", str(tmp_path), "--no-progress"]
    argv += ["--encoder", "vit_tiny_dev", "--weights", "random", "--num-workers", "0", "--no-qc"]
    assert main(argv) == 0
    with h5py.File(tmp_path / "CMU-1-Small-Region.h5") as f:
        a = dict(f["coords"].attrs)
        extent, mpp = float(f.attrs["extent_level0"]), float(f.attrs["level0_mpp"])
    trident_patch_src = a["patch_size"] * a["level0_magnification"] / a["target_magnification"]
    assert abs(trident_patch_src - extent) < 1e-6  # 256.51 level-0 px, 128 µm
    assert round(trident_patch_src) == a["patch_size_level0"]
    assert abs(trident_patch_src * mpp - 128.0) < 1e-6
