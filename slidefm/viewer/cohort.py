"""The slides a viewer may show: one slide, or the rows of a manifest. Only these are reachable,
by ``slide_id``; a path never comes from a request.

Each slide opens lazily, once, behind a lock; a slide that cannot be opened keeps its error
(shown in the cohort page) and the others work. ``errors.csv`` written by ``encode-slides`` in
the features folder adds each failed slide's encoding error.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pandas as pd

from slidefm.io.manifest import read_manifest
from slidefm.viewer.deepzoom import OVERLAP, TILE_SIZE
from slidefm.wsi.reader import SlideReader, slide_id_from_path

# Manifest columns that are not shown as labels.
HIDDEN_COLUMNS = ("slide_id", "case_id", "path", "report")


@dataclasses.dataclass
class OpenSlideView:
    """An open slide: the reader (properties, µm/px) and its Deep Zoom generator."""

    reader: SlideReader
    dz: Any  # openslide.deepzoom.DeepZoomGenerator


@dataclasses.dataclass
class SlideEntry:
    """One slide of the cohort. ``labels``: manifest columns to display; ``encode_error``: the
    row of ``errors.csv`` for this slide, if any."""

    slide_id: str
    path: str | None
    features: Path | None
    case_id: str
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    encode_error: str | None = None
    _view: OpenSlideView | None = None
    _error: str | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def open(self) -> OpenSlideView:
        """The open slide (opened on first use); raises ``SlideUnavailable`` with the cause."""
        with self._lock:
            if self._view is None and self._error is None:
                try:
                    if not self.path:
                        raise FileNotFoundError("no slide path in the manifest")
                    from openslide.deepzoom import DeepZoomGenerator

                    reader = SlideReader(self.path)
                    self._view = OpenSlideView(
                        reader, DeepZoomGenerator(reader.handle, TILE_SIZE, OVERLAP, False)
                    )
                except Exception as e:  # any open failure is shown, never raised to the server
                    self._error = f"{type(e).__name__}: {e}"
            if self._view is None:
                raise SlideUnavailable(f"{self.slide_id}: cannot open slide ({self._error})")
            return self._view

    @property
    def open_error(self) -> str | None:
        try:
            self.open()
        except SlideUnavailable:
            return self._error
        return None

    def close(self) -> None:
        with self._lock:
            if self._view is not None:
                self._view.reader.close()
                self._view = None


class SlideUnavailable(RuntimeError):
    """The slide cannot be opened (→ HTTP 404 with the cause)."""


def _features_path(features: str | Path | None, slide_id: str) -> Path | None:
    if features is None:
        return None
    f = Path(features)
    if f.suffix == ".h5":
        return f
    return f / f"{slide_id}.h5"


def _encode_errors(features: str | Path | None) -> dict[str, str]:
    """slide_id → error from ``errors.csv`` (and per-rank ``errors.rank*.csv``)."""
    if features is None or Path(features).suffix == ".h5":
        return {}
    out: dict[str, str] = {}
    for p in sorted(Path(features).glob("errors*.csv")):
        try:
            df = pd.read_csv(p, dtype=str)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if {"slide_id", "error"} <= set(df.columns):
            out.update(dict(zip(df["slide_id"], df["error"].fillna(""))))
    return out


class Cohort:
    """Ordered ``slide_id`` → ``SlideEntry``, plus the manifest (for reports) when given."""

    def __init__(self, entries: list[SlideEntry], manifest: pd.DataFrame | None = None):
        self.entries = {e.slide_id: e for e in entries}
        self.manifest = manifest

    @classmethod
    def from_slide(cls, slide: str | Path, features: str | Path | None = None) -> Cohort:
        sid = slide_id_from_path(slide)
        return cls(
            [SlideEntry(sid, str(Path(slide).resolve()), _features_path(features, sid), sid)]
        )

    @classmethod
    def from_manifest(cls, manifest: str | Path, features: str | Path | None = None) -> Cohort:
        df = read_manifest(manifest, required=("slide_id",))
        if features is not None and Path(features).suffix == ".h5":
            raise ValueError("with --manifest, --features must be the folder of <slide_id>.h5")
        errors = _encode_errors(features)
        entries = []
        for row in df.to_dict("records"):
            sid = str(row["slide_id"])
            labels = {
                k: (None if pd.isna(v) else v) for k, v in row.items() if k not in HIDDEN_COLUMNS
            }
            path = row.get("path")
            entries.append(
                SlideEntry(
                    sid,
                    None if path is None or pd.isna(path) else str(path),
                    _features_path(features, sid),
                    str(row.get("case_id", sid)),
                    labels,
                    errors.get(sid),
                )
            )
        return cls(entries, df)

    def get(self, slide_id: str) -> SlideEntry | None:
        return self.entries.get(slide_id)

    def close(self) -> None:
        for e in self.entries.values():
            e.close()
