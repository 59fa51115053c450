"""The cross-validation protocol shared by every slide-level evaluation (MIL classification
and survival, slide-embedding probes, Cox probes; tile probes use ``patient_split``).

One run = patient-grouped, label-stratified partitions over several seeds (``eval.splits``;
saved to ``splits.csv`` and reused, or given with ``--splits``, or the manifest's ``split``
column), one model per (seed, fold) whose seed is ``fold_seed(seed, fold)``, out-of-fold
predictions pooled over folds and scored per fold / seed / overall with patient-bootstrap 95%
CIs (``eval.report`` / ``eval.survival``). A fold finished by the same run is read back
(``finished_fold``) instead of recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from slidefm.eval.targets import Task

SPLIT_PARTS = ("train", "val", "test")


def parse_list(s: str | None) -> list[str] | None:
    """``"a, b,,c"`` → ["a", "b", "c"]; empty or None → None."""
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def parse_labels(s: str | None) -> list[str]:
    return parse_list(s) or []


def parse_seeds(s: str | None) -> list[int]:
    """Comma-separated integer seeds (default [0])."""
    try:
        return [int(x) for x in parse_list(s) or ["0"]]
    except ValueError as e:
        raise ValueError(f"--seeds must be comma-separated integers, got {s!r}") from e


def parse_horizons(s: str | None, time: np.ndarray, event: np.ndarray) -> list[float]:
    """Times for time-dependent AUC: ``--horizons`` or the event-time quartiles."""
    from slidefm.eval.survival import default_horizons

    if not s:
        return default_horizons(time, event)
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--horizons must be comma-separated numbers, got {s!r}") from e


def event_task(event_col: str) -> Task:
    """The event column as a binary 'task', so survival folds are stratified by the event."""
    from slidefm.eval.targets import Task

    return Task((event_col,), ("0", "1"), False)


def label_strata(df: pd.DataFrame, labels: Sequence[str]) -> list[str]:
    """One stratum per row: the label value(s) joined with '|' (multi-label: the combination)."""
    return df[list(labels)].astype(str).agg("|".join, axis=1).tolist()


def fold_seed(seed: int, fold: int) -> int:
    """The seed of one (seed, fold)'s model: distinct per fold, the same on every re-run."""
    return int(seed) * 1000 + int(fold)


def run_splits(
    df: pd.DataFrame,
    strata: Sequence[str],
    seeds: Sequence[int],
    out_csv: str | Path,
    given: str | Path | None = None,
    n_folds: int = 5,
    val_fraction: float = 0.2,
) -> pd.DataFrame:
    """The partitions of a run, saved to ``out_csv``: a ``given`` split file (its rows of
    ``seeds``), the manifest's own ``split`` column (``n_folds == 0``), or patient-grouped
    folds stratified by ``strata`` (one string per row: the label, or the event). A split file
    already at ``out_csv`` is reused only when it was made for these strata."""
    from slidefm.eval.splits import (
        load_or_make_splits,
        load_splits,
        save_splits,
        splits_from_manifest,
    )

    sdf = df.assign(_stratum=list(strata))
    if given:
        splits = load_splits(given, df["slide_id"].astype(str).tolist())
        splits = splits[splits["seed"].isin(list(seeds))].reset_index(drop=True)
        if splits.empty:
            raise ValueError(f"{given} has none of seeds {list(seeds)}")
    elif n_folds == 0:
        splits = splits_from_manifest(sdf, "_stratum", seeds)
    else:
        splits = load_or_make_splits(out_csv, sdf, "_stratum", n_folds, seeds, val_fraction)
        want = dict(zip(sdf["slide_id"].astype(str), sdf["_stratum"]))
        if (splits["slide_id"].map(want) != splits["stratum"].astype(str)).any():
            raise ValueError(
                f"{out_csv} was made for another label; use a new --out, or pass it explicitly with --splits to reuse its partitions"
            )
        return splits
    save_splits(splits, out_csv)
    return splits


def iter_folds(
    splits: pd.DataFrame, df: pd.DataFrame, require: Sequence[str] = SPLIT_PARTS
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(seed, fold, {train, val, test: manifest row indices}) of every fold in order; an empty
    part named in ``require`` is an error naming the fold."""
    from slidefm.eval.splits import fold_indices

    pos = {s: i for i, s in enumerate(df["slide_id"].astype(str))}
    for (seed, fold), part in splits.groupby(["seed", "fold"], sort=True):
        idx = fold_indices(part, pos)
        for name in require:
            if len(idx[name]) == 0:
                raise ValueError(
                    f"seed {seed} fold {fold}: empty {name} split; use fewer folds or more patients"
                )
        yield int(seed), int(fold), idx


def n_folds_of(splits: pd.DataFrame) -> int:
    """How many (seed, fold) pairs ``iter_folds`` yields (for progress bars)."""
    return int(splits.groupby(["seed", "fold"]).ngroups)


def finished_fold(fold_dir: Path, chash: str) -> pd.DataFrame | None:
    """The predictions of a fold finished by the same run (same ``config_hash``), else None."""
    import pandas as pd

    done, meta_path = fold_dir / "predictions.csv", fold_dir / "meta.json"
    if (
        done.is_file()
        and meta_path.is_file()
        and json.loads(meta_path.read_text()).get("config_hash") == chash
    ):
        return pd.read_csv(done, dtype={"slide_id": str, "case_id": str})
    return None


def patient_split(cases: np.ndarray, seed: int, fractions=(0.5, 0.2, 0.3)) -> np.ndarray:
    """'train' / 'val' / 'test' per element of ``cases`` from a seeded permutation of the
    unique patients (same seed → same split for every encoder): the tile-probe protocol."""
    uniq = np.unique(cases)
    if len(uniq) < 3:
        raise ValueError(f"tile probes need ≥ 3 patients (train/val/test), got {len(uniq)}")
    perm = np.random.default_rng(seed).permutation(len(uniq))
    n_va = max(1, round(fractions[1] * len(uniq)))
    n_te = max(1, round(fractions[2] * len(uniq)))
    n_tr = max(1, len(uniq) - n_va - n_te)
    part = np.empty(len(uniq), dtype=object)
    part[perm[:n_tr]], part[perm[n_tr : n_tr + n_va]], part[perm[n_tr + n_va :]] = SPLIT_PARTS
    return part[np.searchsorted(uniq, cases)]


def survival_fold_frame(df: pd.DataFrame, rows: np.ndarray, seed: int, fold: int,
                        time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                        fit_risk: np.ndarray) -> pd.DataFrame:  # fmt: skip
    """One fold's test slides ``rows``: seed, fold, slide_id, case_id, time, event, risk_raw
    and ``risk`` standardised by the fold model's risks on its own training data
    (``fit_risk``), so folds can be pooled."""
    import pandas as pd

    from slidefm.eval.survival import normalise_fold_risk

    return pd.DataFrame({
        "seed": seed, "fold": fold,
        "slide_id": df["slide_id"].iloc[rows].astype(str).to_numpy(),
        "case_id": df["case_id"].iloc[rows].astype(str).to_numpy(),
        "time": time[rows], "event": event[rows], "risk_raw": risk,
        "risk": normalise_fold_risk(risk, fit_risk),
    })  # fmt: skip


def score_survival(preds: pd.DataFrame, out: Path, horizons: str | None, n_boot: int,
                   seed: int) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Pooled out-of-fold slide risks → ``predictions.csv``, ``patient_predictions.csv`` (mean
    risk per patient) and (patients, C-index / time-dependent AUC result with bootstrap CIs);
    the AUC horizons default to the first seed's event-time quartiles."""
    from slidefm.eval.report import write_csv
    from slidefm.eval.survival import evaluate_survival, patient_risks

    write_csv(preds, out / "predictions.csv")
    patients = patient_risks(preds)
    write_csv(patients, out / "patient_predictions.csv")
    first = patients[patients["seed"] == patients["seed"].min()]
    times = parse_horizons(horizons, first["time"].to_numpy(), first["event"].to_numpy())
    return patients, evaluate_survival(patients, times, n_boot=n_boot, seed=seed)
