"""Cohort manifests: a CSV with ``slide_id, case_id, path`` plus task columns.

Every check here raises ``ManifestError`` with the file, the rows and what to do, because a bad
manifest found halfway through a cohort costs hours.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from slidefm.options import SLIDE_LEVEL_RISK

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest the user must fix."""


_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_slide_id(slide_id: str, where: str = "") -> str:
    """``slide_id`` if it is one safe file-name component, else ``ManifestError``.

    Every command names per-slide files ``<slide_id>.h5`` / ``.png`` inside its output folder;
    ``../x``, ``a/b`` or ``/abs`` would write outside it (or into a hidden subfolder), and a
    leading dot collides with the atomic writer's temporary names.
    """
    sid = str(slide_id)
    bad = (
        not sid.strip()
        or sid in (".", "..")
        or sid.startswith(".")
        or bool(_UNSAFE_ID.search(sid))
        or len(sid.encode()) > 200
    )
    if bad:
        raise ManifestError(
            f"{where + ': ' if where else ''}slide_id {sid!r} is not a safe file name "
            "(no '/', '\\', control characters or leading '.', at most 200 bytes); rename it"
        )
    return sid


def _rows(df: pd.DataFrame, mask: pd.Series, n: int = 5) -> str:
    ids = (
        df.loc[mask, "slide_id"].astype(str).tolist()
        if "slide_id" in df
        else df.index[mask].tolist()
    )
    more = f" (+{len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(map(str, ids[:n])) + more


def read_manifest(
    path: str | Path,
    required: Iterable[str] = ("slide_id",),
    check_paths: bool = False,
) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    - ``required`` columns must exist and be non-empty; ``slide_id`` must be unique.
    - ``case_id`` defaults to ``slide_id`` when absent (one slide per patient).
    - relative ``path`` values are resolved against the manifest's folder.
    - ``check_paths`` makes missing slide files an error.
    - a ``split`` column must keep each ``case_id`` in one split.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Manifest {path} not found")
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "case_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"Manifest {path} is not a readable CSV: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(f"Manifest {path} lacks column(s) {missing}; it has {list(df.columns)}")
    for c in required:
        empty = df[c].isna() | (df[c].astype(str).str.strip() == "")
        if empty.any():
            raise ManifestError(
                f"Manifest {path}: column {c!r} is empty in {int(empty.sum())} row(s) (rows {list(df.index[empty][:5])})"
            )
    if "slide_id" in df:
        df["slide_id"] = df["slide_id"].astype(str).str.strip()
        for i, sid in enumerate(df["slide_id"]):
            check_slide_id(sid, f"Manifest {path}, row {i + 2}")
        dup = df["slide_id"].duplicated(keep=False)
        if dup.any():
            raise ManifestError(f"Manifest {path}: duplicate slide_id(s): {_rows(df, dup)}")
        if "case_id" not in df:
            df["case_id"] = df["slide_id"]
    if "mpp" in df:
        df["mpp"] = _parse_mpp(path)
    if "path" in df:
        base = path.parent
        df["path"] = [
            str(p) if Path(str(p)).is_absolute() else str((base / str(p)).resolve())
            for p in df["path"]
        ]
        if check_paths:
            gone = ~df["path"].map(lambda p: Path(p).exists())
            if gone.any():
                raise ManifestError(
                    f"Manifest {path}: {int(gone.sum())} slide file(s) not found: {_rows(df, gone)}"
                )
    if "split" in df and "case_id" in df:
        per_case = df.groupby("case_id")["split"].nunique()
        bad = per_case[per_case > 1]
        if len(bad):
            raise ManifestError(
                f"Manifest {path}: patient(s) in more than one split: {', '.join(bad.index[:5])}"
            )
    return df.reset_index(drop=True)


def _parse_mpp(path: Path) -> list[float | None]:
    """The ``mpp`` column as positive finite floats (empty cell = no override); a value such as
    ``abc``, ``NaN``, ``0`` or ``-1`` is an error naming its row, read from the raw text so a
    literal ``NaN`` is not mistaken for an empty cell."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw.columns = [str(c).strip() for c in raw.columns]
    out: list[float | None] = []
    for i, v in enumerate(raw["mpp"]):
        v = str(v).strip()
        if not v:
            out.append(None)
            continue
        try:
            f = float(v)
        except ValueError:
            f = float("nan")
        if not (math.isfinite(f) and f > 0):
            raise ManifestError(
                f"Manifest {path}, row {i + 2}, column 'mpp': {v!r} is not a positive number of "
                "µm/px (leave the cell empty to use the slide's metadata)"
            )
        out.append(f)
    return out


def check_labels(df: pd.DataFrame, column: str, allowed: Iterable | None = None) -> None:
    """Raise if ``column`` is missing, has NaNs, or has values outside ``allowed``."""
    if column not in df:
        raise ManifestError(f"Manifest has no label column {column!r}; columns: {list(df.columns)}")
    if df[column].isna().any():
        raise ManifestError(
            f"Label column {column!r} is empty for slide(s): {_rows(df, df[column].isna())}"
        )
    if allowed is not None:
        allowed = set(allowed)
        bad = ~df[column].isin(allowed)
        if bad.any():
            raise ManifestError(
                f"Label column {column!r} has unknown value(s) {sorted(set(df.loc[bad, column]))[:5]}; allowed: {sorted(allowed)}"
            )


# Ways a 0/1 event cell may be written (as read by pandas).
EVENT_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "False": 0, "True": 1}


def check_survival(df: pd.DataFrame, time_col: str, event_col: str) -> tuple:
    """Validate right-censored follow-up columns → (time (N,) float64, event (N,) int64).

    ``time_col``: follow-up in any unit (days, months), a finite number ≥ 0 on every row;
    ``event_col``: 1 = event observed at that time, 0 = censored. Slides of one patient
    (``case_id``) must share both values (follow-up is per patient), and the cohort needs at
    least one event (a risk model cannot be fit or scored without one).
    """
    import numpy as np

    for c, what in ((time_col, "--time"), (event_col, "--event")):
        if c not in df:
            raise ManifestError(f"Manifest has no {what} column {c!r}; columns: {list(df.columns)}")
    time = pd.to_numeric(df[time_col], errors="coerce")
    missing = time.isna() | ~np.isfinite(time.fillna(0.0))
    if missing.any():
        raise ManifestError(
            f"Survival time column {time_col!r} is missing or not a number for slide(s): {_rows(df, missing)}"
        )
    neg = time < 0
    if neg.any():
        raise ManifestError(
            f"Survival time column {time_col!r} has negative time(s) {sorted(time[neg].tolist())[:5]} for slide(s): {_rows(df, neg)}"
        )
    ev = df[event_col].astype(str).str.strip().map(EVENT_VALUES)
    bad = ev.isna()
    if bad.any():
        raise ManifestError(
            f"Event column {event_col!r} must be 1 (event) or 0 (censored); found {sorted(set(df.loc[bad, event_col].astype(str)))[:5]} for slide(s): {_rows(df, bad)}"
        )
    if "case_id" in df:
        per_case = pd.DataFrame({"c": df["case_id"], "t": time, "e": ev}).groupby("c").nunique()
        split = per_case[(per_case["t"] > 1) | (per_case["e"] > 1)]
        if len(split):
            raise ManifestError(
                f"Patient(s) whose slides disagree on {time_col!r}/{event_col!r}: {', '.join(map(str, split.index[:5]))}; follow-up is per patient"
            )
    if ev.sum() == 0:
        raise ManifestError(
            f"Event column {event_col!r} has no events (all {len(df)} rows censored): a survival model cannot be fit or scored"
        )
    return time.to_numpy(np.float64), ev.to_numpy(np.int64)


def read_cohort_manifest(path: str | Path, slide_level_only: bool = False) -> pd.DataFrame:
    """``read_manifest`` for commands that split a cohort into folds (``mil train``, ``probe``):
    ``case_id`` is required, because without patients slides of one patient can land in different folds. ``slide_level_only`` accepts a
    manifest without it (every slide its own patient) and warns what that risks."""
    df = read_manifest(path, required=("slide_id",))
    header = pd.read_csv(path, nrows=0).columns.astype(str).str.strip()
    if "case_id" not in header:
        if not slide_level_only:
            raise ManifestError(
                f"Manifest {path} has no case_id column: without patients {SLIDE_LEVEL_RISK}. "
                "Add case_id, or pass --slide-level-only to treat every slide as its own patient"
            )
        log.warning("--slide-level-only: no case_id, every slide is its own patient; %s",
                    SLIDE_LEVEL_RISK)  # fmt: skip
    return df


def strip_labels(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """A copy of ``df`` whose label ``columns`` have leading/trailing whitespace removed, with a
    warning naming them: ``"Pos "`` is a typo of ``"Pos"``, never an extra class."""
    out = df.copy()
    for c in columns:
        if c not in out or not (
            out[c].dtype == object or pd.api.types.is_string_dtype(out[c].dtype)
        ):
            continue
        vals = out[c]
        stripped = vals.where(vals.isna(), vals.astype(str).str.strip())
        changed = vals.notna() & (stripped != vals)
        if changed.any():
            ex = sorted({repr(v) for v in vals[changed]})[:3]
            log.warning("label column %r: stripped whitespace from %d value(s) (%s)",
                        c, int(changed.sum()), ", ".join(ex))  # fmt: skip
            out[c] = stripped
    return out
