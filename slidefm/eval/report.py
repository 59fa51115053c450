"""Score a cross-validation prediction table: per fold, per seed (pooled out-of-fold) and a
headline over seeds, each with patient-bootstrap 95% CIs; write CSV, JSON and ROC PNGs.

Prediction table: one row per (seed, fold, test slide) with ``case_id``, targets (``y`` or
``y_<label>``) and ``prob_<class>`` columns (see ``slidefm.eval.targets``). Every slide is in
exactly one test fold per seed, so pooling the folds of one seed scores every slide once.

Headline (``summary``): the mean over seeds of the pooled out-of-fold metric; its CI comes
from resampling patients (``case_id``) and recomputing that same seed mean, so the interval
reflects which patients happened to be in the cohort.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidefm.eval.metrics import bootstrap_ci, metric_functions, roc_curve_png
from slidefm.eval.targets import Task
from slidefm.io.atomic import atomic_path


def _arrays(df: pd.DataFrame, task: Task) -> tuple[np.ndarray, np.ndarray]:
    y = df[task.target_columns].to_numpy()
    y = y if task.multilabel else y[:, 0]
    return y.astype(np.int64), df[task.prob_columns].to_numpy(dtype=np.float64)


def _seed_mean(fn):
    """metric over a table whose score matrix has the seed in column 0 → mean over seeds."""

    def inner(t: np.ndarray, s: np.ndarray) -> float:
        vals = [fn(t[s[:, 0] == k], s[s[:, 0] == k, 1:]) for k in np.unique(s[:, 0])]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    return inner


def summarise_metrics(
    fns: dict,
    y: np.ndarray,
    p_seeded: np.ndarray,
    groups: np.ndarray,
    fold_df: pd.DataFrame,
    seed_df: pd.DataFrame,
    n_boot: int,
    alpha: float,
    seed: int,
) -> dict[str, dict[str, float]]:
    """{metric: value + patient-bootstrap CI of the seed-mean, sd over seeds, fold mean/sd}.

    ``p_seeded`` is the predictions with their seed in column 0 (see ``_seed_mean``); one
    summary rule for every task (classification here, survival in ``eval.survival``).
    """
    summary = {}
    for i, (name, fn) in enumerate(fns.items()):
        v, lo, hi = bootstrap_ci(
            _seed_mean(fn), y, p_seeded, n_boot=n_boot, alpha=alpha, seed=seed + i, groups=groups
        )
        summary[name] = {
            "value": v,
            "lo": lo,
            "hi": hi,
            "sd_over_seeds": float(seed_df[name].std(ddof=1)) if len(seed_df) > 1 else 0.0,
            "fold_mean": float(fold_df[name].mean()),
            "fold_sd": float(fold_df[name].std(ddof=1)) if len(fold_df) > 1 else 0.0,
        }
    return summary


def evaluate_predictions(
    preds: pd.DataFrame, task: Task, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, Any]:
    """→ {"per_fold": [...], "per_seed": [...], "summary": {metric: {...}}, counts} (module doc)."""
    fns = metric_functions(task.num_classes, task.multilabel)

    def scored(part: pd.DataFrame, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` + every metric of ``part`` with its patient-bootstrap CI (``_lo``/``_hi``)."""
        y, p = _arrays(part, task)
        for i, (name, fn) in enumerate(fns.items()):
            v, lo, hi = bootstrap_ci(
                fn,
                y,
                p,
                n_boot=n_boot,
                alpha=alpha,
                seed=seed + i,
                groups=part["case_id"].to_numpy(),
            )
            row.update({name: v, f"{name}_lo": lo, f"{name}_hi": hi})
        return row

    folds = [
        scored(part, {"seed": int(s), "fold": int(f), "n": len(part)})
        for (s, f), part in preds.groupby(["seed", "fold"], sort=True)
    ]
    seeds = [
        scored(part, {"seed": int(s), "n": len(part)})
        for s, part in preds.groupby("seed", sort=True)
    ]
    y, p = _arrays(preds, task)
    p_seeded = np.concatenate([preds[["seed"]].to_numpy(dtype=np.float64), p], axis=1)
    fold_df, seed_df = pd.DataFrame(folds), pd.DataFrame(seeds)
    summary = summarise_metrics(
        fns, y, p_seeded, preds["case_id"].to_numpy(), fold_df, seed_df, n_boot, alpha, seed
    )
    return {
        "per_fold": folds,
        "per_seed": seeds,
        "summary": summary,
        "n_slides_or_patients": int(preds.groupby("seed").size().iloc[0]),
        "n_seeds": int(preds["seed"].nunique()),
        "n_folds": int(preds["fold"].nunique()),
        "ci": f"{int(round(100 * (1 - alpha)))}% percentile bootstrap over patients (case_id), n_boot={n_boot}",
    }


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default, allow_nan=True))
    return path


def write_result_tables(
    result: dict[str, Any], meta: dict[str, Any], out: Path, prefix: str = ""
) -> dict[str, Path]:
    """The per-fold and per-seed metric CSVs and ``results.json`` (``meta`` + result) of one
    protocol run, for every task; returns their paths by name."""
    return {
        "fold_metrics": write_csv(
            pd.DataFrame(result["per_fold"]), out / f"{prefix}fold_metrics.csv"
        ),
        "seed_metrics": write_csv(
            pd.DataFrame(result["per_seed"]), out / f"{prefix}seed_metrics.csv"
        ),
        "results": write_json({**meta, **result}, out / f"{prefix}results.json"),
    }


def write_report(
    out_dir: str | Path,
    preds: pd.DataFrame,
    task: Task,
    result: dict[str, Any],
    meta: dict[str, Any],
    prefix: str = "",
) -> dict[str, Path]:
    """Write ``{prefix}fold_metrics.csv``, ``{prefix}seed_metrics.csv``, ``{prefix}results.json``
    (``meta`` + result) and one pooled ROC PNG per seed; returns the paths."""
    out = Path(out_dir)
    paths = write_result_tables(result, meta, out, prefix)
    model = str(meta.get("model", ""))
    note = "; ".join(meta.get("notes", []))
    for s, part in preds.groupby("seed"):
        y, p = _arrays(part, task)
        if task.multilabel:
            for c, name in enumerate(task.classes):
                paths[f"roc_seed{s}_{name}"] = roc_curve_png(
                    y[:, c],
                    p[:, c],
                    out / f"{prefix}roc_seed{s}_{name}.png",
                    title=f"{model} {name} (seed {s}, out-of-fold)".strip(),
                    model=model,
                    note=note,
                )
        else:
            title = f"{model} on {task.labels[0]}, seed {s}, out-of-fold".strip()
            paths[f"roc_seed{s}"] = roc_curve_png(
                y,
                p,
                out / f"{prefix}roc_seed{s}.png",
                class_names=list(task.classes),
                title=title,
                model=model,
                note=note,
            )
    return paths


def format_summary(result: dict[str, Any]) -> str:
    """One line per metric: ``auroc 0.912 [0.871, 0.948] (sd over seeds 0.010)``."""
    lines = []
    for name, m in result["summary"].items():
        lines.append(
            f"{name:>24s} {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]  (sd over seeds {m['sd_over_seeds']:.3f}; folds {m['fold_mean']:.3f} ± {m['fold_sd']:.3f})"
        )
    return "\n".join(lines)
