"""Slide-level classification metrics, bootstrap confidence intervals and their figures.

One implementation for every evaluation (MIL, probes, zero-shot), so numbers from different
models are comparable. The metrics are plain NumPy (scikit-learn's input validation costs
~1 ms a call, which dominates 1000-draw bootstraps over many folds); they equal scikit-learn's
``roc_auc_score``, ``balanced_accuracy_score``, ``f1_score(zero_division=0)`` and
``accuracy_score`` (tested). Conventions:

- ``y_true``: (N,) int class indices, or (N, C) {0,1} for multi-label targets;
- ``y_score``: (N,) positive-class score (binary), or (N, C) class probabilities/scores;
- AUROC is binary for 2 classes and macro one-vs-rest otherwise (macro over labels for
  multi-label);
- a metric that is undefined on the data (e.g. AUROC with one class present) returns NaN
  instead of raising, so one degenerate fold or bootstrap draw does not kill a whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics as skm

from slidefm.io.atomic import atomic_path

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _binary_scores(y_score: np.ndarray) -> np.ndarray:
    """(N,) or (N, 2) scores → (N,) positive-class scores."""
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.ndim == 2 and y_score.shape[1] == 2:
        return y_score[:, 1]
    if y_score.ndim == 2 and y_score.shape[1] == 1:
        return y_score[:, 0]
    return y_score


def _binary_auroc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann–Whitney U / (n_pos · n_neg) with average ranks for ties; NaN without both classes."""
    pos = np.asarray(pos, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: np.ndarray, y_score: np.ndarray, num_classes: int | None = None) -> float:
    """Area under the ROC curve; NaN when undefined (a single class present).

    Binary: ``y_score`` (N,) or (N, 2), positive class 1. Multi-class: (N, C) scores, macro
    one-vs-rest over the classes present in ``y_true``. Multi-label: ``y_true`` (N, C) {0,1},
    macro over labels that have both values present.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 2:  # multi-label
        per = [_binary_auroc(y_true[:, c] == 1, y_score[:, c]) for c in range(y_true.shape[1])]
        per = [a for a in per if np.isfinite(a)]
        return float(np.mean(per)) if per else float("nan")
    c = num_classes or (y_score.shape[1] if y_score.ndim == 2 else 2)
    if c <= 2:
        return _binary_auroc(y_true == 1, _binary_scores(y_score))
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    # A class absent from y_true has no defined one-vs-rest AUROC.
    return float(np.mean([_binary_auroc(y_true == k, y_score[:, k]) for k in present]))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches (subset accuracy for multi-label (N, C) inputs)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    eq = y_true == y_pred
    return float((eq.all(axis=1) if eq.ndim == 2 else eq).mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (robust to imbalance)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    return float(np.mean([np.mean(y_pred[y_true == k] == k) for k in np.unique(y_true)]))


def _f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, k) -> float:
    tp = np.sum((y_true == k) & (y_pred == k))
    denom = np.sum(y_true == k) + np.sum(y_pred == k)  # 2TP + FP + FN
    return float(2 * tp / denom) if denom else 0.0


def f1(y_true: np.ndarray, y_pred: np.ndarray, average: str = "binary") -> float:
    """F1 score. ``average``: ``binary`` (positive class 1), ``macro`` (unweighted mean over
    the classes in ``y_true`` ∪ ``y_pred``) or ``weighted`` (by true support).

    Undefined F1 (no predicted and no true positives) counts as 0, as sklearn's
    ``zero_division=0``.
    """
    if average not in ("binary", "macro", "weighted"):
        raise ValueError(f"f1 average must be binary, macro or weighted, not {average!r}")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    if average == "binary":
        return _f1_per_class(y_true, y_pred, 1)
    classes = np.union1d(y_true, y_pred)
    per = np.array([_f1_per_class(y_true, y_pred, k) for k in classes])
    if average == "macro":
        return float(per.mean())
    support = np.array([np.sum(y_true == k) for k in classes], dtype=np.float64)
    return float((per * support).sum() / support.sum())


def _group_members(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices sorted by group, and each group's start and size in that order."""
    _, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    sizes = np.bincount(inv)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return order, starts, sizes


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: np.ndarray,
    y_score_or_pred: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap: (point estimate on all data, lower, upper) at level ``1 - alpha``.

    Rows are resampled with replacement; with ``groups`` (N,) (e.g. patient ids) whole groups
    are resampled instead, because slides of one patient are not independent. Draws on which
    the metric is undefined (NaN, e.g. one class only) are dropped; if fewer than half of the
    draws are usable the interval is (NaN, NaN).
    """
    y_true = np.asarray(y_true)
    y_sp = np.asarray(y_score_or_pred)
    if len(y_true) != len(y_sp):
        raise ValueError(f"bootstrap_ci: {len(y_true)} labels but {len(y_sp)} scores/predictions")
    point = float(metric_fn(y_true, y_sp))
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != len(y_true):
            raise ValueError(f"bootstrap_ci: {len(groups)} groups but {len(y_true)} labels")
        order, starts, sizes = _group_members(groups)
    n_units = len(y_true) if groups is None else len(sizes)
    if n_units == 0:
        return point, float("nan"), float("nan")
    stats = []
    for _ in range(n_boot):
        pick = rng.integers(0, n_units, size=n_units)
        if groups is None:
            idx = pick
        else:  # concatenate the rows of the picked groups without a Python loop
            lens = sizes[pick]
            offsets = np.repeat(starts[pick] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
            idx = order[offsets + np.arange(lens.sum())]
        v = metric_fn(y_true[idx], y_sp[idx])
        if np.isfinite(v):
            stats.append(v)
    if len(stats) < max(1, n_boot // 2):
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(np.asarray(stats), [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def predictions_from_scores(y_score: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Scores → hard class predictions: (N,) binary scores ``> threshold``; (N, C) argmax."""
    y_score = np.asarray(y_score)
    if y_score.ndim == 1:
        return (y_score > threshold).astype(np.int64)
    return y_score.argmax(axis=1).astype(np.int64)


def metric_functions(num_classes: int, multilabel: bool = False) -> dict[str, MetricFn]:
    """Headline metrics of a task as ``fn(y_true, y_prob) -> float``.

    y_prob: (N, C) probabilities (softmax for single-label, per-label sigmoid for multi-label;
    multi-label predictions threshold at 0.5). Binary tasks report AUROC and binary F1;
    multi-class tasks macro AUROC, macro and weighted F1.
    """
    fns: dict[str, MetricFn] = {}
    if multilabel:
        fns["auroc_macro"] = auroc
        fns["f1_macro"] = lambda t, p: float(
            np.mean([f1(t[:, c], (p[:, c] > 0.5).astype(int)) for c in range(t.shape[1])])
        )
        fns["balanced_accuracy_macro"] = lambda t, p: float(
            np.nanmean(
                [balanced_accuracy(t[:, c], (p[:, c] > 0.5).astype(int)) for c in range(t.shape[1])]
            )
        )
        return fns
    c = num_classes
    fns["auroc" if c == 2 else "auroc_macro"] = lambda t, p: auroc(t, p, num_classes=c)
    fns["balanced_accuracy"] = lambda t, p: balanced_accuracy(t, p.argmax(1))
    fns["accuracy"] = lambda t, p: accuracy(t, p.argmax(1))
    if c == 2:
        fns["f1"] = lambda t, p: f1(t, p.argmax(1), "binary")
    else:
        fns["f1_macro"] = lambda t, p: f1(t, p.argmax(1), "macro")
        fns["f1_weighted"] = lambda t, p: f1(t, p.argmax(1), "weighted")
    return fns


def classification_report(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    multilabel: bool = False,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """All ``metric_functions`` with bootstrap CIs: ``{name: {"value", "lo", "hi"}}``.

    y_true: (N,) int classes, or (N, C) {0,1} multi-label; y_prob: (N, C) probabilities;
    ``groups`` (N,) e.g. patient ids, resampled whole.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    out = {}
    for i, (name, fn) in enumerate(metric_functions(y_prob.shape[1], multilabel).items()):
        v, lo, hi = bootstrap_ci(
            fn, y_true, y_prob, n_boot=n_boot, alpha=alpha, seed=seed + i, groups=groups
        )
        out[name] = {"value": v, "lo": lo, "hi": hi}
    return out


def _note(fig, note: str) -> None:
    """Red caption above the title, clear of the tick labels (``bbox_inches="tight"`` keeps
    it in the file)."""
    if note:
        fig.text(0.5, 1.0, note, ha="center", va="bottom", fontsize=6.5, color="tab:red")


def _save_fig(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_curve_png(
    y_true: np.ndarray,
    y_score: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str = "ROC",
    model: str = "",
    note: str = "",
) -> Path:
    """Write ROC curve(s) as PNG: one curve for binary, one-vs-rest per class otherwise.

    y_true: (N,) int; y_score: (N,) or (N, C). Each legend entry names the model, the class
    scored as positive and its AUROC; ``note`` is a red caption (e.g. random weights).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if y_score.ndim == 1 or y_score.shape[1] <= 2:
        curves = [
            (
                class_names[1] if class_names and len(class_names) > 1 else "positive",
                y_true == 1,
                _binary_scores(y_score),
            )
        ]
    else:
        names = list(class_names) if class_names else [str(k) for k in range(y_score.shape[1])]
        curves = [(names[k], y_true == k, y_score[:, k]) for k in range(y_score.shape[1])]
    for name, pos, s in curves:
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = skm.roc_curve(pos.astype(int), s)
        who = f"{model}: " if model else ""
        what = f"{name} vs rest" if len(curves) > 1 else f"positive = {name}"
        label = f"{who}{what} (AUROC {skm.auc(fpr, tpr):.3f}, n={len(pos)})"
        ax.plot(fpr, tpr, lw=1.5, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance (AUROC 0.5)")
    ax.set(
        xlabel="False positive rate",
        ylabel="True positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    _note(fig, note)
    return _save_fig(fig, path)


def confusion_matrix_png(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    title: str = "Confusion matrix",
    note: str = "",
) -> Path:
    """Write a confusion matrix PNG (rows: true class, columns: predicted; row-normalised
    when ``normalize``, with the raw counts printed in each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names) if class_names else int(max(np.max(y_true), np.max(y_pred)) + 1)
    names = list(class_names) if class_names else [str(k) for k in range(n)]
    cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(n)))
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n))
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(n):
        for j in range(n):
            txt = f"{shown[i, j]:.2f}\n({cm[i, j]})" if normalize else str(cm[i, j])
            ax.text(
                j,
                i,
                txt,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[i, j] > 0.6 * shown.max() else "black",
            )
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted", ylabel="True", title=title)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    if normalize:
        ax.set_title(f"{title}\n(row = true class: fraction, (count))", fontsize=9)
    _note(fig, note)
    return _save_fig(fig, path)
