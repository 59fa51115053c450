"""Slide-embedding files: one HDF5 per cohort with (slide_id, embedding) and provenance.

Layout: ``slide_ids`` (N,) UTF-8 strings, ``embeddings`` (N, E) float32; root attrs
``schema = "slidefm.slide_embeddings"``, ``checkpoint_sha256`` (or ``"random"``), ``seed``,
``slidefm_version``, ``encoder_config`` and whatever else the writer passes. Written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import slidefm
from slidefm.io.atomic import atomic_path

SCHEMA = "slidefm.slide_embeddings"
REQUIRED_ATTRS = ("checkpoint_sha256", "seed", "encoder_config")


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
        for k, v in {**attrs, "schema": SCHEMA, "slidefm_version": slidefm.__version__}.items():
            f.attrs[k] = _attr_value(v)
    return path


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(slide_ids, embeddings (N, E) float32, attrs) of a ``write_embeddings`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding file not found; run `slidefm embed-slides`")
    with h5py.File(path, "r") as f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a slidefm slide-embedding file")
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["slide_ids"][()]]
        emb = np.asarray(f["embeddings"][()], dtype=np.float32)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return ids, emb, attrs
