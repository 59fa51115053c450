"""Slide-embedding files: one HDF5 per cohort with (slide_id, embedding) and provenance.

Layout: ``slide_ids`` (N,) UTF-8 strings, ``embeddings`` (N, E) float32; root attrs
``schema = "slidefm.slide_embeddings"``, ``checkpoint_sha256`` (or ``"random"``), ``seed``,
``slidefm_version``, ``encoder_config`` and whatever else the writer passes. Written atomically;
each dataset carries a ``crc32`` of its bytes. ``read_embeddings`` refuses, with one line naming
the file, what every reader would otherwise trip over: unreadable or truncated files, missing
datasets, mismatched lengths, duplicate ids, NaN/Inf rows and failed checksums.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import slidefm
from slidefm.io.atomic import atomic_path
from slidefm.io.features import CHECKSUM_ATTR, checksum

SCHEMA = "slidefm.slide_embeddings"
REQUIRED_ATTRS = ("checkpoint_sha256", "seed", "encoder_config")


class EmbeddingFileError(ValueError):
    """A slide-embedding file that is missing pieces, corrupt or inconsistent."""


def _attr_value(v: Any) -> Any:
    """HDF5 stores scalars and strings; anything else (dicts, lists, None) goes as JSON."""
    if isinstance(v, str | int | float | bool | np.integer | np.floating):
        return v
    return json.dumps(v, sort_keys=True, default=str)


def write_embeddings(
    path: str | Path,
    slide_ids: Sequence[str],
    embeddings: np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Write (slide_ids, embeddings[N, E]) atomically with provenance ``attrs``.

    ``attrs`` must hold checkpoint_sha256 (``"random"`` for untrained weights), seed and
    encoder_config; slidefm_version and schema are added here.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    ids = [str(s) for s in slide_ids]
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"embeddings shape {emb.shape} does not match {len(ids)} slide ids")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate slide ids in embeddings")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN/Inf; refusing to write")
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"embedding attrs lack {missing}")
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("slide_ids", data=ids, dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("embeddings", data=emb)
        f["embeddings"].attrs[CHECKSUM_ATTR] = checksum(f["embeddings"][()])
        f["slide_ids"].attrs[CHECKSUM_ATTR] = zlib.crc32("\n".join(ids).encode())
        for k, v in {**attrs, "schema": SCHEMA, "slidefm_version": slidefm.__version__}.items():
            f.attrs[k] = _attr_value(v)
    return path


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(slide_ids, embeddings (N, E) float32, attrs) of a ``write_embeddings`` file, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding file not found; run `slidefm embed-slides`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EmbeddingFileError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        if f.attrs.get("schema") != SCHEMA:
            raise EmbeddingFileError(f"{path}: not a slidefm slide-embedding file")
        missing = [k for k in ("slide_ids", "embeddings") if k not in f]
        if missing:
            raise EmbeddingFileError(
                f"{path}: no {' / '.join(missing)} dataset(s) (keys: {list(f.keys())}); "
                "re-run `slidefm embed-slides`"
            )
        try:
            raw_ids, raw = f["slide_ids"][()], f["embeddings"][()]
        except OSError as e:
            raise EmbeddingFileError(f"{path}: unreadable datasets, truncated? ({e})") from e
        sums = {k: f[k].attrs.get(CHECKSUM_ATTR) for k in ("slide_ids", "embeddings")}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    ids = [s.decode() if isinstance(s, bytes) else str(s) for s in np.ravel(raw_ids)]
    if sums["embeddings"] is not None and checksum(raw) != int(sums["embeddings"]):
        raise EmbeddingFileError(f"{path}: 'embeddings' fails its checksum (the file is corrupt)")
    if sums["slide_ids"] is not None and zlib.crc32("\n".join(ids).encode()) != int(
        sums["slide_ids"]
    ):
        raise EmbeddingFileError(f"{path}: 'slide_ids' fails its checksum (the file is corrupt)")
    emb = np.asarray(raw, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise EmbeddingFileError(
            f"{path}: embeddings {emb.shape} do not match {len(ids)} slide ids (N, E)"
        )
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise EmbeddingFileError(f"{path}: duplicate slide id(s) {dup[:5]}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        rows = [ids[i] for i in np.flatnonzero(bad)[:5]]
        raise EmbeddingFileError(
            f"{path}: {int(bad.sum())} slide(s) have NaN/Inf embeddings ({', '.join(rows)}); "
            "re-embed them"
        )
    return ids, emb, attrs
