"""The HDF5 tile-feature file: one ``<slide_id>.h5`` per slide. The only writer and reader.

Layout (see ARCHITECTURE.md):
- ``features`` (N, D) float16/float32 tile embeddings;
- ``coords`` (N, 2) int64 level-0 (x, y) pixel of each tile's top-left corner;
- ``grid`` (N, 2) int32 (col, row) = floor((coords - min(coords)) / stride_level0), the tile
  stride (= ``patch_size_level0`` without overlap; TRIDENT/CLAM files: see ``foreign_grid_step``);
- ``tissue_fraction`` (N,) float32.
Root attrs carry provenance (encoder, weights, mpp, seed, config hash) and ``complete=True``.
``coords`` also carries TRIDENT/CLAM attribute names so their readers work on our files.
Files are written atomically, so a file under the final name is complete. Each dataset
carries a ``crc32`` attr of its bytes, verified on read (flipped bits are an error, not numbers);
files without it (TRIDENT/CLAM, older slidefm) still read. ``read_features`` and
``check_cohort`` hold the one rule every reader applies (``validate_features``).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidefm.io.atomic import atomic_path

SCHEMA = "slidefm.features"
SCHEMA_VERSION = 1

REQUIRED_ATTRS = (
    "schema",
    "schema_version",
    "slide_id",
    "encoder",
    "encoder_weights",
    "target_mpp",
    "patch_size",
    "patch_size_level0",
    "config_hash",
    "seed",
    "complete",
)
# Names TRIDENT / CLAM readers look for on the ``coords`` dataset.
TRIDENT_COORD_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "level0_width",
    "level0_height",
    "name",
)


# Checksum attr on every dataset; a grid cell index above this is not a slide (2^16 tiles
# along one side is > 16 M level-0 px at 256 px tiles, far beyond any scanner).
CHECKSUM_ATTR = "crc32"
MAX_GRID_CELL = 1 << 16


class FeatureFileError(ValueError):
    """A feature file that is missing, incomplete, corrupt or not of our schema."""


def checksum(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order, stored dtype): cheap next to any encoder (~GB/s)."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


@dataclasses.dataclass
class SlideFeatures:
    """Tile features of one slide, in memory.

    features: (N, D) float; coords: (N, 2) int64 level-0 px (x, y) top-left;
    grid: (N, 2) int32 (col, row); tissue_fraction: (N,) float32 in [0, 1]; attrs: provenance.
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    grid: np.ndarray
    tissue_fraction: np.ndarray
    attrs: dict[str, Any]

    @property
    def num_tiles(self) -> int:
        return int(self.coords.shape[0])


def grid_from_coords(coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """(N, 2) level-0 coords → (N, 2) int32 (col, row) grid positions.

    grid = floor((coords - min(coords)) / patch_size_level0). With overlap, pass the stride
    in level-0 pixels instead of the patch size so neighbours stay one cell apart.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if coords.size == 0:
        return np.zeros((0, 2), dtype=np.int32)
    rel = coords - coords.min(axis=0, keepdims=True)
    return np.floor(rel / float(patch_size_level0) + 1e-6).astype(np.int32)


def foreign_grid_step(coords: np.ndarray, attrs: dict[str, Any]) -> float:
    """Grid step (level-0 px) of a TRIDENT/CLAM file: the tile *stride*, not the tile size.

    With ``overlap`` (pixels at the target magnification, as TRIDENT writes it) neighbours are
    ``patch_size_level0 − overlap × patch_size_level0 / patch_size`` level-0 px apart; using the
    patch size would put several tiles on one cell. Without attrs, the smallest non-zero
    coordinate step is the stride.
    """
    diffs = (
        np.concatenate([np.diff(np.unique(coords[:, i])) for i in (0, 1)]) if len(coords) else []
    )
    diffs = np.asarray(diffs)
    observed = float(diffs[diffs > 0].min()) if (diffs > 0).any() else None
    p0 = attrs.get("patch_size_level0")
    if not p0:
        return observed or 1.0
    p0 = float(p0)
    overlap, patch = float(attrs.get("overlap") or 0), float(attrs.get("patch_size") or 0)
    stride = p0 - (round(overlap * p0 / patch) if overlap and patch else 0)
    if stride <= 0:
        return observed or p0
    # Coordinates closer than the stated stride: the attrs do not describe this lattice.
    return observed if observed is not None and observed < stride - 0.5 else stride


def write_features(path: str | Path, sf: SlideFeatures) -> Path:
    """Validate and write ``sf`` atomically to ``path``; returns the final path."""
    n = sf.num_tiles
    feats = np.asarray(sf.features)
    if feats.ndim != 2 or feats.shape[0] != n:
        raise FeatureFileError(
            f"{sf.slide_id}: features shape {feats.shape} does not match {n} coords"
        )
    if not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise FeatureFileError(
            f"{sf.slide_id}: {bad} tile(s) have NaN/Inf features; refusing to write"
        )
    if sf.grid.shape != (n, 2) or sf.tissue_fraction.shape != (n,):
        raise FeatureFileError(f"{sf.slide_id}: grid/tissue_fraction shapes do not match {n} tiles")
    missing = [
        k
        for k in REQUIRED_ATTRS
        if k not in sf.attrs and k not in ("schema", "schema_version", "complete", "slide_id")
    ]
    if missing:
        raise FeatureFileError(f"{sf.slide_id}: missing attrs {missing}")
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        dc = f.create_dataset("coords", data=np.asarray(sf.coords, dtype=np.int64))
        f.create_dataset("grid", data=np.asarray(sf.grid, dtype=np.int32))
        f.create_dataset("tissue_fraction", data=np.asarray(sf.tissue_fraction, dtype=np.float32))
        for name in ("features", "coords", "grid", "tissue_fraction"):
            f[name].attrs[CHECKSUM_ATTR] = checksum(f[name][()])
        attrs = dict(sf.attrs)
        attrs.update(schema=SCHEMA, schema_version=SCHEMA_VERSION, slide_id=sf.slide_id)
        for k, v in attrs.items():
            if k == "complete":
                continue
            f.attrs[k] = "" if v is None else v
        for k in TRIDENT_COORD_ATTRS:
            src = "slide_id" if k == "name" else k
            if src in attrs and attrs[src] is not None:
                dc.attrs[k] = attrs[src]
        # Last write before close: a reader that sees complete=True sees everything else.
        f.attrs["complete"] = True
        f.flush()
    return path


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Root attrs of a feature file, without loading arrays."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _decode(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({e})") from e


def is_complete(path: str | Path, config_hash: str | None = None) -> bool:
    """True if ``path`` is a complete slidefm feature file (with ``config_hash`` if given)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        a = read_attrs(path)
    except FeatureFileError:
        return False
    if a.get("schema") != SCHEMA or not a.get("complete"):
        return False
    return config_hash is None or a.get("config_hash") == config_hash


def _read_checked(path: Path, ds: h5py.Dataset) -> np.ndarray:
    """A dataset's array, verified against its ``crc32`` attr when it has one."""
    try:
        a = ds[()]
    except OSError as e:  # truncated chunk / unreadable block
        raise FeatureFileError(f"{path}: dataset {ds.name!r} is unreadable ({e})") from e
    want = ds.attrs.get(CHECKSUM_ATTR)
    if want is not None and checksum(a) != int(want):
        raise FeatureFileError(
            f"{path}: dataset {ds.name.lstrip('/')!r} fails its checksum (the file is corrupt); "
            "re-encode the slide"
        )
    return a


def validate_features(sf: SlideFeatures, path: str | Path) -> None:
    """The one rule every reader of tile features applies (pretrain, embed-slides, align,
    zero-shot, retrieve, mil, probe inputs, heatmap): ≥ 1 tile, features (N, D) finite,
    coords / grid (N, 2), tissue_fraction (N,), grid cells in [0, MAX_GRID_CELL]."""
    n = sf.num_tiles
    feats, grid = sf.features, sf.grid
    if n == 0:
        raise FeatureFileError(f"{path}: no tiles; re-encode the slide or drop it from the cohort")
    if feats.ndim != 2 or feats.shape[0] != n:
        raise FeatureFileError(f"{path}: features {feats.shape} do not match {n} coords")
    if grid.shape != (n, 2):
        raise FeatureFileError(f"{path}: grid {grid.shape} does not match {n} tiles ({n}, 2)")
    if sf.tissue_fraction.shape != (n,):
        raise FeatureFileError(
            f"{path}: tissue_fraction {sf.tissue_fraction.shape} does not match {n} tiles"
        )
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise FeatureFileError(
            f"{path}: {int(bad.sum())} of {n} tile(s) have NaN/Inf features "
            f"(first: tile {int(np.flatnonzero(bad)[0])}); re-encode the slide"
        )
    if grid.min() < 0 or grid.max() > MAX_GRID_CELL:
        raise FeatureFileError(
            f"{path}: grid values span [{int(grid.min())}, {int(grid.max())}], outside "
            f"[0, {MAX_GRID_CELL}] cells; the file's grid is corrupt"
        )


def read_features(path: str | Path, *, dtype: Any = np.float32) -> SlideFeatures:
    """Read and validate (``validate_features``, checksums) a feature file. Also reads
    TRIDENT/CLAM-style files (``features``/``feats`` + ``coords``).

    Foreign files get ``grid`` from coords on their tile stride (``foreign_grid_step``: the
    ``patch_size_level0`` and ``overlap`` attrs, or the smallest coordinate step) and
    tissue_fraction = 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
        if attrs.get("schema") == SCHEMA and not attrs.get("complete"):
            raise FeatureFileError(
                f"{path}: incomplete feature file (interrupted write); re-run encode-slides"
            )
        fkey = next((k for k in ("features", "feats") if k in f), None)
        if fkey is None:
            raise FeatureFileError(f"{path}: no 'features' dataset (keys: {list(f.keys())})")
        feats = np.asarray(_read_checked(path, f[fkey]), dtype=dtype)
        if feats.ndim == 3 and feats.shape[0] == 1:  # TRIDENT/CLAM sometimes store (1, N, D)
            feats = feats[0]
        if "coords" not in f:
            raise FeatureFileError(
                f"{path}: no 'coords' dataset; slide encoders need tile positions"
            )
        raw_coords = _read_checked(path, f["coords"])
        if raw_coords.size % 2:
            raise FeatureFileError(f"{path}: coords {raw_coords.shape} are not (N, 2)")
        coords = np.asarray(raw_coords, dtype=np.int64).reshape(-1, 2)
        cattrs = {k: _decode(v) for k, v in f["coords"].attrs.items()}
        if "grid" in f:
            grid = np.asarray(_read_checked(path, f["grid"]), dtype=np.int64)
        else:
            step = foreign_grid_step(coords, {**cattrs, **attrs})
            grid = grid_from_coords(coords, step)
            attrs.setdefault("patch_size_level0", cattrs.get("patch_size_level0", step))
            attrs.setdefault("stride_level0", step)
        tf = (
            np.asarray(_read_checked(path, f["tissue_fraction"]), dtype=np.float32)
            if "tissue_fraction" in f
            else np.ones(len(coords), np.float32)
        )
    slide_id = str(attrs.get("slide_id") or path.stem)
    # int64 first so out-of-range values are seen before the int32 cast could wrap them
    sf = SlideFeatures(slide_id, feats, coords, grid, tf, attrs)
    validate_features(sf, path)
    sf.grid = grid.astype(np.int32)
    return sf


def cohort_key(path: str | Path) -> tuple[int, int, Any, Any]:
    """(tiles, feature dim, tile encoder, encoder weights) of a feature file, from its attrs
    and dataset shape only (no data read)."""
    path = Path(path)
    a = read_attrs(path)
    try:
        with h5py.File(path, "r") as f:
            key = next((k for k in ("features", "feats") if k in f), None)
            if key is None:
                raise FeatureFileError(f"{path}: no 'features' dataset (keys: {list(f.keys())})")
            shape = f[key].shape
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({e})") from e
    if len(shape) < 2:
        raise FeatureFileError(f"{path}: features {shape} are not (N, D)")
    return int(shape[-2]), int(shape[-1]), a.get("encoder"), a.get("encoder_weights")


def check_cohort(paths: Sequence[str | Path]) -> list[tuple[int, int]]:
    """Refuse a cohort whose files hold no tiles or come from different tile encoders (dim,
    encoder name or weights differ from the first file's); returns (tiles, dim) per file.
    Cheap: attrs and shapes only; ``read_features`` checks the contents."""
    shapes, first = [], None
    for p in paths:
        n, d, enc, weights = cohort_key(p)
        if n == 0:
            raise FeatureFileError(f"{p}: no tiles; re-encode the slide or drop it from the cohort")
        if first is None:
            first = (p, d, enc, weights)
        elif (d, enc, weights) != first[1:]:
            raise FeatureFileError(
                f"{p}: features from tile encoder {enc} ({weights}, {d}-d) but {first[0]} has "
                f"{first[2]} ({first[3]}, {first[1]}-d); encode the cohort with one encoder"
            )
        shapes.append((n, d))
    return shapes


def check_encoder_matches(
    path: str | Path, attrs: dict[str, Any], trained: dict, what: str
) -> None:
    """Refuse tile features from another tile encoder (name or weights) than ``trained`` (the
    feature attrs a model recorded; ``what`` names it). Unrecorded values are not compared."""
    for k in ("encoder", "encoder_weights"):
        have, want = attrs.get(k), (trained or {}).get(k)
        if have is not None and want is not None and str(have) != str(want):
            raise FeatureFileError(
                f"{path}: features from tile encoder {attrs.get('encoder')} "
                f"({attrs.get('encoder_weights')}) but {what} was trained on "
                f"{trained.get('encoder')} ({trained.get('encoder_weights')}); re-encode with it"
            )
