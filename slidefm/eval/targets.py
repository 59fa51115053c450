"""Manifest label columns → integer targets, and slide → patient aggregation of predictions.

One label column gives a single-label task (2 classes = binary, more = multi-class, classes
sorted so the positive class of a 0/1 or False/True column is index 1). Several columns, each
0/1, give a multi-label task. Prediction tables use the same names everywhere:
``prob_<class>`` columns and ``y`` (single-label) or ``y_<label>`` (multi-label) targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.io.manifest import ManifestError, check_labels

# How 0/1 multi-label cells may be written (as read by pandas).
BINARY_STRINGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "False": 0, "True": 1}


@dataclasses.dataclass(frozen=True)
class Task:
    """What is predicted: label column(s), class names and whether targets are multi-label."""

    labels: tuple[str, ...]
    classes: tuple[str, ...]
    multilabel: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def prob_columns(self) -> list[str]:
        return [f"prob_{c}" for c in self.classes]

    @property
    def target_columns(self) -> list[str]:
        return [f"y_{c}" for c in self.classes] if self.multilabel else ["y"]

    def to_dict(self) -> dict:
        return {
            "labels": list(self.labels),
            "classes": list(self.classes),
            "multilabel": self.multilabel,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(tuple(d["labels"]), tuple(str(c) for c in d["classes"]), bool(d["multilabel"]))


def _class_key(v: object) -> tuple:
    """Sort numbers numerically, then strings; False/True/0/1 put the positive class last."""
    s = str(v)
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, {"false": 0.0, "true": 1.0}.get(s.lower(), 0.0), s)


def make_task(
    df: pd.DataFrame, labels: Sequence[str], classes: Sequence[str] | None = None
) -> Task:
    """Validate the label column(s) of ``df`` and describe the task.

    ``classes`` (single-label only) fixes the class list and order; a value outside it is an
    error naming the slides. Multi-label columns must hold only 0/1.
    """
    labels = tuple(labels)
    if not labels:
        raise ManifestError("No label column given (--label COL, or COL1,COL2 for multi-label)")
    for c in labels:
        check_labels(df, c)
    if len(labels) > 1:
        for c in labels:
            check_labels(df.assign(**{c: df[c].astype(str)}), c, allowed=BINARY_STRINGS)
        return Task(labels, labels, True)
    col = labels[0]
    values = df[col].astype(str)
    if classes is not None:
        check_labels(df.assign(**{col: values}), col, allowed=[str(c) for c in classes])
        names = tuple(str(c) for c in classes)
    else:
        names = tuple(sorted(values.unique(), key=_class_key))
    if len(names) < 2:
        raise ManifestError(
            f"Label column {col!r} has a single value {names}; a classifier needs ≥ 2 classes"
        )
    return Task(labels, names, False)


def check_class_sizes(df: pd.DataFrame, task: Task) -> None:
    """Refuse a single-label class with one slide (a typo, or a class that cannot be both
    trained on and tested) in our words, before scikit-learn's fold warnings; for commands
    that split a cohort into folds (``mil train``, ``probe``)."""
    if task.multilabel:
        return
    col = task.labels[0]
    values = df[col].astype(str)
    counts = values.value_counts()
    lone = [c for c in task.classes if counts.get(c, 0) == 1]
    if lone:
        where = ", ".join(f"{c!r} (slide {df.loc[values == c, 'slide_id'].iloc[0]})" for c in lone)
        raise ManifestError(
            f"Label column {col!r}: class(es) {where} have a single slide, which cannot be both "
            f"trained on and tested (a typo?); classes and slide counts: "
            f"{ {c: int(counts.get(c, 0)) for c in task.classes} }. Fix the label or drop the slide"
        )


def encode_targets(df: pd.DataFrame, task: Task) -> np.ndarray:
    """(N,) int class indices, or (N, C) int {0,1} for multi-label."""
    if task.multilabel:
        return np.stack(
            [df[c].astype(str).map(BINARY_STRINGS).to_numpy() for c in task.labels],
            1,
        ).astype(np.int64)
    lut = {c: i for i, c in enumerate(task.classes)}
    vals = df[task.labels[0]].astype(str)
    unknown = sorted(set(vals) - set(lut))
    if unknown:
        raise ManifestError(
            f"Label {task.labels[0]!r} has value(s) {unknown[:5]} unknown to this model; known: {list(task.classes)}"
        )
    return vals.map(lut).to_numpy().astype(np.int64)


def target_frame(y: np.ndarray, task: Task) -> pd.DataFrame:
    """Targets as prediction-table columns (``y`` or ``y_<label>``)."""
    if task.multilabel:
        return pd.DataFrame(np.asarray(y), columns=task.target_columns)
    return pd.DataFrame({"y": np.asarray(y)})


def prediction_frame(
    test: pd.DataFrame,
    y: np.ndarray,
    task: Task,
    seed: int,
    fold: int,
    prob: np.ndarray | None = None,
) -> pd.DataFrame:
    """Prediction-table rows of one (seed, fold): ``seed, fold, slide_id, case_id``, the targets
    ``y`` of the ``test`` manifest rows and, when given, ``prob`` [N, C] as ``prob_<class>``."""
    keys = pd.DataFrame(
        {
            "seed": int(seed),
            "fold": int(fold),
            "slide_id": test["slide_id"].astype(str).to_numpy(),
            "case_id": test["case_id"].astype(str).to_numpy(),
        }
    )
    parts = [keys, target_frame(y, task)]
    if prob is not None:
        parts.append(pd.DataFrame(prob, columns=task.prob_columns))
    return pd.concat(parts, axis=1)


def check_feature_files(df: pd.DataFrame, features_dir: str | Path) -> list[Path]:
    """``<features_dir>/<slide_id>.h5`` for every row; a missing one is an error that lists them."""
    d = Path(features_dir)
    if not d.is_dir():
        raise FileNotFoundError(
            f"Feature directory {d} not found; run `slidefm encode-slides` first"
        )
    paths = [d / f"{s}.h5" for s in df["slide_id"].astype(str)]
    missing = [p.stem for p in paths if not p.is_file()]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ManifestError(
            f"{len(missing)} slide(s) of the manifest have no feature file in {d}: {', '.join(missing[:5])}{more}. "
            "Encode them with `slidefm encode-slides`, or drop them from the manifest."
        )
    return paths


def aggregate_patients(
    preds: pd.DataFrame, task: Task, keys: Sequence[str] = ("seed", "fold")
) -> pd.DataFrame:
    """Slide predictions → one row per patient (within each ``keys`` group): mean probability
    over the patient's slides. A patient whose slides disagree on the label is an error (a
    patient-level label cannot be defined)."""
    keys = [k for k in keys if k in preds]
    by = [*keys, "case_id"]
    tcols = task.target_columns
    n_labels = preds.groupby(by)[tcols].nunique().max(axis=1)
    bad = n_labels[n_labels > 1]
    if len(bad):
        cases = sorted({k[-1] if isinstance(k, tuple) else k for k in bad.index})
        raise ManifestError(
            f"Patient-level aggregation: patient(s) with slides of different labels: {', '.join(map(str, cases[:5]))}"
        )
    g = preds.groupby(by, sort=False)
    out = g[task.prob_columns].mean()
    out[tcols] = g[tcols].first()
    out["n_slides"] = g.size()
    out = out.reset_index()
    out["slide_id"] = out["case_id"]
    return out
