"""Patient-grouped, label-stratified cross-validation splits, saved to CSV.

Slides of one patient share morphology and label, so a patient (``case_id``) must never sit on
both sides of a split. Splits are computed once per (seed, fold) and written to a CSV so every
model is evaluated on exactly the same partitions (the eva protocol).

Split table (one row per slide per seed and fold):
``seed, fold, slide_id, case_id, stratum, split`` with ``split`` in {train, val, test}.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from slidefm.io.atomic import atomic_path

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["seed", "fold", "slide_id", "case_id", "stratum", "split"]
SPLIT_NAMES = ("train", "val", "test")


def _carve_val(
    idx: np.ndarray, strata: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (train, val), grouped by patient and stratified by label.

    Uses one fold of a ~1/val_fraction-fold StratifiedGroupKFold; with too few slides per
    class to stratify (tiny cohorts), a shuffled GroupKFold that still keeps patients whole.
    """
    n_groups = len(np.unique(groups[idx]))
    if n_groups < 2:
        raise ValueError(
            "Too few patients to carve a validation split; lower --folds or add patients"
        )
    k = max(2, min(round(1.0 / val_fraction), n_groups))
    largest = np.bincount(strata[idx]).max()
    if largest >= k:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # rare classes: the outer split has already said so
            warnings.filterwarnings("ignore", message="The least populated class")
            tr, va = next(splitter.split(np.zeros(len(idx)), strata[idx], groups[idx]))
    else:
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
        tr, va = next(splitter.split(np.zeros(len(idx)), groups=groups[idx]))
    return idx[tr], idx[va]


def make_cv_splits(
    df: pd.DataFrame,
    stratify_col: str,
    n_folds: int = 5,
    seeds: Sequence[int] = (0,),
    val_fraction: float = 0.2,
    group_col: str = "case_id",
) -> pd.DataFrame:
    """K-fold CV: each slide is in exactly one test fold per seed; a validation split (for early
    stopping) is carved from the other folds. All three parts are grouped by ``group_col``.

    ``stratify_col`` values are used as strata as they are (for multi-label targets pass a
    column holding the label combination).
    """
    for c in ("slide_id", group_col, stratify_col):
        if c not in df:
            raise ValueError(f"Cannot build splits: manifest has no column {c!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = df[group_col].astype(str).to_numpy()
    strata = pd.factorize(df[stratify_col].astype(str))[0]
    n_groups = len(np.unique(groups))
    if n_folds < 2 or n_folds > n_groups:
        raise ValueError(f"--folds {n_folds} needs 2 ≤ folds ≤ number of patients ({n_groups})")
    if np.bincount(strata).max() < n_folds:
        raise ValueError(
            f"--folds {n_folds}: no class has {n_folds} slides to stratify; use fewer folds"
        )
    per_class = df.groupby(df[stratify_col].astype(str))[group_col].nunique()
    few = per_class[per_class < n_folds]
    if len(few):  # said in our words; scikit-learn's "least populated class" warning is muted
        log.warning(
            "--folds %d: class(es) %s have fewer patients than folds, so some test folds hold "
            "none of them (per-fold metrics of those classes are undefined); use fewer folds "
            "or add patients",
            n_folds,
            ", ".join(f"{c!r} ({n})" for c, n in few.items()),
        )
    rows = []
    for seed in seeds:
        outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class")
            folds = list(outer.split(np.zeros(len(df)), strata, groups))
        for fold, (train_idx, test_idx) in enumerate(folds):
            tr, va = _carve_val(train_idx, strata, groups, val_fraction, seed * 1000 + fold)
            split = np.empty(len(df), dtype=object)
            split[tr], split[va], split[test_idx] = "train", "val", "test"
            rows.append(
                pd.DataFrame(
                    {
                        "seed": seed,
                        "fold": fold,
                        "slide_id": df["slide_id"].astype(str).to_numpy(),
                        "case_id": groups,
                        "stratum": df[stratify_col].astype(str).to_numpy(),
                        "split": split,
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)[SPLIT_COLUMNS]


def splits_from_manifest(
    df: pd.DataFrame, stratify_col: str, seeds: Sequence[int] = (0,)
) -> pd.DataFrame:
    """Use a manifest's own ``split`` column (train/val/test) as one fixed fold for each seed."""
    if "split" not in df:
        raise ValueError(
            "Manifest has no 'split' column; use --folds K for cross-validation instead"
        )
    bad = sorted(set(df["split"].astype(str)) - set(SPLIT_NAMES))
    if bad:
        raise ValueError(
            f"Manifest 'split' column has value(s) {bad}; allowed: {list(SPLIT_NAMES)}"
        )
    base = pd.DataFrame(
        {
            "fold": 0,
            "slide_id": df["slide_id"].astype(str),
            "case_id": df["case_id"].astype(str),
            "stratum": df[stratify_col].astype(str),
            "split": df["split"].astype(str),
        }
    )
    out = pd.concat([base.assign(seed=s) for s in seeds], ignore_index=True)[SPLIT_COLUMNS]
    check_splits(out)
    return out


def check_splits(splits: pd.DataFrame, slide_ids: Sequence[str] | None = None) -> None:
    """Raise ValueError if a patient crosses splits within a (seed, fold), a slide is duplicated
    within a fold, or (with ``slide_ids``) the table does not cover exactly these slides."""
    missing = [c for c in SPLIT_COLUMNS if c not in splits]
    if missing:
        raise ValueError(f"Split table lacks column(s) {missing}")
    for (seed, fold), part in splits.groupby(["seed", "fold"]):
        if part["slide_id"].duplicated().any():
            raise ValueError(f"Split table: seed {seed} fold {fold} lists a slide twice")
        per_case = part.groupby("case_id")["split"].nunique()
        bad = per_case[per_case > 1]
        if len(bad):
            raise ValueError(
                f"Split table: seed {seed} fold {fold}: patient(s) in more than one split: {', '.join(map(str, bad.index[:5]))}"
            )
        if slide_ids is not None:
            have, want = set(part["slide_id"]), set(map(str, slide_ids))
            if have != want:
                raise ValueError(
                    f"Split table seed {seed} fold {fold} does not match the manifest: "
                    f"{len(want - have)} slide(s) missing, {len(have - want)} unknown; delete the splits file to rebuild it"
                )


def fold_indices(part: pd.DataFrame, pos: Mapping[str, int]) -> dict[str, np.ndarray]:
    """One (seed, fold) of a split table → {train, val, test: int64 manifest rows}, where
    ``pos`` maps slide_id → its row in the manifest (the order features/embeddings are held in)."""
    return {
        n: np.array([pos[s] for s in part.loc[part["split"] == n, "slide_id"]], dtype=np.int64)
        for n in SPLIT_NAMES
    }


def save_splits(splits: pd.DataFrame, path: str | Path) -> Path:
    """Write the split table atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        splits.to_csv(tmp, index=False)
    return path


def load_splits(path: str | Path, slide_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Read and validate a split table written by ``save_splits``."""
    splits = pd.read_csv(path, dtype={"slide_id": str, "case_id": str, "stratum": str})
    check_splits(splits, slide_ids)
    return splits


def load_or_make_splits(
    path: str | Path,
    df: pd.DataFrame,
    stratify_col: str,
    n_folds: int,
    seeds: Sequence[int],
    val_fraction: float = 0.2,
) -> pd.DataFrame:
    """Reuse the split file at ``path`` if it covers the manifest, seeds and folds; else make
    and save it. Reuse keeps later runs (other models) on the same partitions."""
    path = Path(path)
    if path.is_file():
        splits = load_splits(path, df["slide_id"].astype(str).tolist())
        if set(splits["seed"]) >= set(seeds) and splits["fold"].nunique() == n_folds:
            return splits[splits["seed"].isin(list(seeds))].reset_index(drop=True)
        raise ValueError(
            f"{path} was made for seeds {sorted(set(splits['seed']))} and {splits['fold'].nunique()} folds; delete it or pass matching --seeds/--folds"
        )
    splits = make_cv_splits(df, stratify_col, n_folds, seeds, val_fraction)
    save_splits(splits, path)
    return splits
