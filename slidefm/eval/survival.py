"""Survival evaluation: Harrell's C-index, time-dependent AUC, patient-bootstrap CIs,
Kaplan–Meier curves of predicted risk groups with the log-rank test.

Conventions: ``time`` (N,) follow-up (any unit), ``event`` (N,) 1 = event / 0 = censored,
``risk`` (N,) higher = shorter expected survival. Survival is scored per **patient** (follow-up
is a patient's, not a slide's): slide risks are averaged per ``case_id`` first.

C-index and AUC are plain NumPy (they run inside 1000-draw bootstraps); they equal
scikit-survival's ``concordance_index_censored`` and ``cumulative_dynamic_auc`` (tested).
Kaplan–Meier and the log-rank test come from scikit-survival (``kaplan_meier_estimator``,
``compare_survival``): a maintained library that works with the project's pandas 3 and
scikit-learn (lifelines 0.30 pins pandas < 3).

Out-of-fold risks of different fold models are on different scales (a Cox model is defined
only up to an additive constant), so before pooling, each fold's risks are standardised with
its own model's risks on its training + validation slides (``normalise_fold_risk``): no test
information is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidefm.eval.metrics import _save_fig, bootstrap_ci
from slidefm.eval.report import summarise_metrics, write_result_tables


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among comparable pairs, the share where the subject who failed first has the
    higher risk (risk ties count ½). A pair (i, j) is comparable when i has an event and
    t_i < t_j, or t_i = t_j with j censored (j was still at risk at t_i); two events at the same
    time are not comparable. NaN without comparable pairs. O(N²) in blocks of rows."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    num, den = 0.0, 0
    for s in range(0, len(t), 2048):
        ti, ei, ri = t[s : s + 2048, None], e[s : s + 2048, None], r[s : s + 2048, None]
        comp = ei & ((ti < t) | ((ti == t) & ~e))
        den += int(comp.sum())
        num += float(np.sum(comp & (ri > r)) + 0.5 * np.sum(comp & (ri == r)))
    return num / den if den else float("nan")


def censoring_survival(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan–Meier of the censoring distribution G(t) = P(C > t) → (unique times, G at them).

    At tied times events come first, so subjects with an event at t leave the censoring risk
    set before the censorings at t (the usual reverse-KM convention)."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    uniq = np.unique(t)
    at_risk = len(t) - np.searchsorted(np.sort(t), uniq, side="left")
    d = np.array([np.sum(e & (t == u)) for u in uniq])
    c = np.array([np.sum(~e & (t == u)) for u in uniq])
    denom = (at_risk - d).astype(np.float64)
    factor = np.where(denom > 0, 1.0 - c / np.maximum(denom, 1), 1.0)
    return uniq, np.cumprod(factor)


def cumulative_dynamic_auc(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float
) -> float:
    """Uno's IPCW cumulative/dynamic AUC at ``horizon``: how well risk separates subjects with
    an event by ``horizon`` (cases, each weighted 1/G(t_i)) from those still event-free after it
    (controls). Risk ties count ½. NaN without cases or controls. G from ``censoring_survival``
    on the same data."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    case = e & (t <= horizon)
    ctrl = t > horizon
    if not case.any() or not ctrl.any():
        return float("nan")
    uniq, g = censoring_survival(t, e)
    g_case = g[np.searchsorted(uniq, t[case], side="right") - 1]
    w = 1.0 / np.maximum(g_case, 1e-12)
    rc, rk = r[case][:, None], r[ctrl][None, :]
    wins = (rc > rk).sum(1) + 0.5 * (rc == rk).sum(1)
    return float(np.sum(w * wins) / (w.sum() * ctrl.sum()))


def default_horizons(time: np.ndarray, event: np.ndarray) -> list[float]:
    """The 25th, 50th and 75th percentiles of the event times (rounded to 3 significant
    digits): horizons that have both cases and controls on any reasonable cohort."""
    t = np.asarray(time, dtype=np.float64)[np.asarray(event).astype(bool)]
    return [float(f"{q:.3g}") for q in np.quantile(t, [0.25, 0.5, 0.75])]


def survival_metric_functions(horizons: Sequence[float]) -> dict:
    """``{name: fn(y (N, 2) [time, event], risk (N,) or (N, 1)) -> float}``."""

    def c_index(y, s):
        return concordance_index(y[:, 0], y[:, 1], np.asarray(s).reshape(len(y), -1)[:, 0])

    fns = {"c_index": c_index}
    for h in horizons:
        fns[f"auc@{h:g}"] = lambda y, s, h=h: cumulative_dynamic_auc(
            y[:, 0], y[:, 1], np.asarray(s).reshape(len(y), -1)[:, 0], h
        )
    return fns


def normalise_fold_risk(test_risk: np.ndarray, fit_risk: np.ndarray) -> np.ndarray:
    """(test − median(fit)) / sd(fit), with ``fit_risk`` the same model's risks on its training
    (+ validation) slides: makes risks of different fold models poolable without using test
    data. A constant model keeps sd 1."""
    fit_risk = np.asarray(fit_risk, dtype=np.float64)
    sd = float(np.std(fit_risk)) if len(fit_risk) > 1 else 0.0
    return (np.asarray(test_risk, dtype=np.float64) - np.median(fit_risk)) / (sd if sd > 0 else 1.0)


def patient_risks(preds: pd.DataFrame, keys: Sequence[str] = ("seed", "fold")) -> pd.DataFrame:
    """Slide rows (``case_id, time, event, risk``, …) → one row per patient and ``keys`` group:
    mean of every ``risk*`` column, the patient's time/event and ``n_slides``."""
    keys = [k for k in keys if k in preds]
    by = [*keys, "case_id"]
    g = preds.groupby(by, sort=False)
    risk_cols = [c for c in preds.columns if c.startswith("risk")]
    out = g[risk_cols].mean()
    out[["time", "event"]] = g[["time", "event"]].first()
    out["n_slides"] = g.size()
    out = out.reset_index()
    return out[[*by, "time", "event", *risk_cols, "n_slides"]]


def evaluate_survival(
    preds: pd.DataFrame,
    horizons: Sequence[float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    risk_col: str = "risk",
) -> dict[str, Any]:
    """Patient table (``seed, fold, case_id, time, event, <risk_col>``) → per fold, per seed
    (pooled out-of-fold) and a headline over seeds, each with patient-bootstrap CIs; the same
    structure as ``eval.report.evaluate_predictions`` (so ``format_summary`` prints it)."""
    fns = survival_metric_functions(horizons)

    def scored(part: pd.DataFrame, row: dict[str, Any]) -> dict[str, Any]:
        y = part[["time", "event"]].to_numpy(np.float64)
        s = part[risk_col].to_numpy(np.float64)
        row["events"] = int(part["event"].sum())
        for i, (name, fn) in enumerate(fns.items()):
            v, lo, hi = bootstrap_ci(
                fn, y, s, n_boot=n_boot, alpha=alpha, seed=seed + i, groups=part["case_id"]
            )
            row.update({name: v, f"{name}_lo": lo, f"{name}_hi": hi})
        return row

    folds = [
        scored(part, {"seed": int(s), "fold": int(f), "n": len(part)})
        for (s, f), part in preds.groupby(["seed", "fold"], sort=True)
    ]
    seeds = [
        scored(part, {"seed": int(s), "n": len(part), **logrank_groups(part, risk_col)})
        for s, part in preds.groupby("seed", sort=True)
    ]
    fold_df, seed_df = pd.DataFrame(folds), pd.DataFrame(seeds)
    y = preds[["time", "event"]].to_numpy(np.float64)
    s_seeded = preds[["seed", risk_col]].to_numpy(np.float64)
    summary = summarise_metrics(
        fns, y, s_seeded, preds["case_id"].to_numpy(), fold_df, seed_df, n_boot, alpha, seed
    )
    return {
        "per_fold": folds,
        "per_seed": seeds,
        "summary": summary,
        "horizons": [float(h) for h in horizons],
        "n_slides_or_patients": int(preds.groupby("seed").size().iloc[0]),
        "n_events": int(preds.groupby("seed")["event"].sum().iloc[0]),
        "n_seeds": int(preds["seed"].nunique()),
        "n_folds": int(preds["fold"].nunique()),
        "ci": f"{int(round(100 * (1 - alpha)))}% percentile bootstrap over patients (case_id), n_boot={n_boot}",
    }


def logrank_groups(part: pd.DataFrame, risk_col: str = "risk") -> dict[str, Any]:
    """Median split of ``risk_col`` (above the median = high risk) → group sizes, events and
    the log-rank χ² p-value (scikit-survival ``compare_survival``); p is NaN when a group is
    empty."""
    high = risk_groups(part[risk_col].to_numpy())
    out = {
        "n_high": int(high.sum()),
        "n_low": int((~high).sum()),
        "events_high": int(part["event"].to_numpy()[high].sum()),
        "events_low": int(part["event"].to_numpy()[~high].sum()),
        "logrank_p": float("nan"),
    }
    if high.any() and (~high).any():
        from sksurv.compare import compare_survival

        y = _structured(part["time"].to_numpy(), part["event"].to_numpy())
        out["logrank_chi2"], out["logrank_p"] = (float(v) for v in compare_survival(y, high))
    return out


def risk_groups(risk: np.ndarray) -> np.ndarray:
    """(N,) bool: True = high risk (strictly above the median of ``risk``)."""
    risk = np.asarray(risk, dtype=np.float64)
    return risk > np.median(risk)


def _structured(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """scikit-survival's structured array (event bool, time float)."""
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, dtype=np.float64))


def km_risk_groups_png(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    path: str | Path,
    title: str,
    time_label: str = "time",
) -> Path:
    """Kaplan–Meier curves of the high- and low-risk halves (median split of ``risk``) with
    95% pointwise CIs, censoring ticks and the log-rank p-value in the legend title, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    high = risk_groups(risk)
    stats = logrank_groups(pd.DataFrame({"time": time, "event": event, "risk": risk}))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, mask, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not mask.any():
            continue
        t, s, (lo, hi) = kaplan_meier_estimator(event[mask], time[mask], conf_type="log-log")
        t = np.concatenate([[0.0], t])  # every curve starts at S(0) = 1
        s, lo, hi = (np.concatenate([[1.0], a]) for a in (s, lo, hi))
        label = f"{name} (n={int(mask.sum())}, events={int(event[mask].sum())})"
        ax.step(t, s, where="post", color=colour, lw=1.6, label=label)
        ax.fill_between(t, lo, hi, step="post", color=colour, alpha=0.15, lw=0)
        cens = time[mask & ~event]
        ax.plot(cens, s[np.searchsorted(t, cens, side="right") - 1], "|", color=colour, ms=6)
    p = stats["logrank_p"]
    ax.set(xlabel=time_label, ylabel="survival probability", title=title, ylim=(0, 1.02))
    ax.set_xlim(left=0)
    ax.legend(loc="lower left", fontsize=8, title=f"log-rank p = {p:.2g}", title_fontsize=8)
    return _save_fig(fig, path)


def write_survival_report(
    out_dir: str | Path,
    preds: pd.DataFrame,
    result: dict[str, Any],
    meta: dict[str, Any],
    prefix: str = "",
    time_label: str = "time",
    risk_col: str = "risk",
) -> dict[str, Path]:
    """``{prefix}fold_metrics.csv``, ``{prefix}seed_metrics.csv``, ``{prefix}results.json`` and
    one Kaplan–Meier PNG per seed (``{prefix}km_seed<s>.png``) of the pooled out-of-fold risk."""
    out = Path(out_dir)
    paths = write_result_tables(result, meta, out, prefix)
    what = meta.get("model") or meta.get("probe") or "model"
    for s, part in preds.groupby("seed"):
        c = concordance_index(part["time"], part["event"], part[risk_col])
        paths[f"km_seed{s}"] = km_risk_groups_png(
            part["time"].to_numpy(),
            part["event"].to_numpy(),
            part[risk_col].to_numpy(),
            out / f"{prefix}km_seed{s}.png",
            title=f"{what}: out-of-fold risk groups, seed {s} (C-index {c:.3f})",
            time_label=time_label,
        )
    return paths


def survival_val_score(
    objective: Any, logits: np.ndarray, y_val: np.ndarray, val_metric: str = "loss"
) -> tuple[float, dict[str, float]]:
    """Early-stopping score of validation ``logits`` (N, K) against (N, 3) targets → (score to
    maximise, metrics): −loss, or the C-index for ``val_metric`` c_index (or auroc)."""
    import torch

    loss = float(objective(torch.as_tensor(logits), torch.as_tensor(y_val)).item())
    c = concordance_index(y_val[:, 0], y_val[:, 1], objective.risk(logits))
    metrics = {"val_loss": loss, "val_c_index": c}
    if val_metric == "loss":
        return -loss, metrics
    return (c if np.isfinite(c) else -np.inf), metrics
