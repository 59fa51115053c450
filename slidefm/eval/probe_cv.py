"""Slide-embedding probes in the cross-validation protocol (``eval.protocol``): ``slidefm probe``.

The same patient-grouped folds and seeds as ``slidefm mil train`` (pass its ``splits.csv`` to
compare on identical partitions). Classification: ``linear`` (logistic regression, C chosen on
the validation split), ``knn`` (cosine, train + val as the memory) and ``fewshot`` (SimpleShot
prototypes, many draws of k slides per class; mean ± sd over draws, folds and seeds). Survival:
an L2-penalised Cox model, the penalty chosen by validation C-index.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import slidefm
from slidefm.eval.protocol import (
    fold_seed,
    iter_folds,
    n_folds_of,
    run_splits,
    score_survival,
    survival_fold_frame,
)

if TYPE_CHECKING:
    import pandas as pd

PROBES = ("linear", "knn", "fewshot")


@dataclasses.dataclass(frozen=True)
class ProbeRun:
    """The inputs of one ``slidefm probe`` run."""

    embeddings: str
    manifest: str
    out: str
    label: str | None = None
    probes: tuple[str, ...] = PROBES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    folds: int = 5
    splits: str | None = None
    k: int = 20
    shots: tuple[int, ...] | None = None  # default eval.probes.FEW_SHOT_KS
    draws: int = 50
    n_boot: int = 1000
    patient_level: bool = False
    slide_level_only: bool = False
    seed: int = 0  # bootstrap
    progress: bool = True
    time: str | None = None  # survival
    event: str | None = None
    horizons: str | None = None


def _inputs(run: ProbeRun, df: pd.DataFrame) -> tuple[np.ndarray, dict[str, Any]]:
    """(embeddings (N, E) float64 in manifest order, their file attributes)."""
    from slidefm.eval.inference import align_embeddings
    from slidefm.io.embeddings import read_embeddings

    ids, emb, attrs = read_embeddings(run.embeddings)
    return align_embeddings(df, list(ids), emb), attrs


def _meta(run: ProbeRun, attrs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"command": extra.pop("command"),
            "random_weights": str(attrs.get("checkpoint_sha256", "")) == "random",
            "embeddings": str(run.embeddings),
            "embedding_attrs": {k: str(v) for k, v in attrs.items()}, **extra,
            "seeds": list(run.seeds), "seed": run.seed}  # fmt: skip


def _fold_probes(run: ProbeRun, x, y, df, splits, task, shots):
    """Every fold's linear / kNN predictions and few-shot draws."""
    from tqdm import tqdm

    from slidefm.eval.probes import few_shot, knn_probe, linear_probe
    from slidefm.eval.targets import prediction_frame

    rows: dict[str, list[pd.DataFrame]] = {"linear": [], "knn": []}
    fs_rows, chosen_c = [], []
    folds = tqdm(iter_folds(splits, df, require=()), total=n_folds_of(splits), desc="probing",
                 unit="fold", disable=not run.progress)  # fmt: skip
    for seed, fold, idx in folds:
        tr, va, te = idx["train"], idx["val"], idx["test"]
        trval = np.concatenate([tr, va])
        test, y_test = df.iloc[te], y[te]
        if "linear" in run.probes:
            res = linear_probe(x[tr], y[tr], x[va], y[va], x[te], task.num_classes, seed=seed)
            chosen_c.append({"seed": seed, "fold": fold, "C": res.best_c})
            rows["linear"].append(prediction_frame(test, y_test, task, seed, fold, res.proba))
        if "knn" in run.probes:
            proba = knn_probe(x[trval], y[trval], x[te], task.num_classes, k=run.k)
            rows["knn"].append(prediction_frame(test, y_test, task, seed, fold, proba))
        if "fewshot" in run.probes:
            fs = few_shot(x[trval], y[trval], x[te], y_test, task.num_classes, shots, run.draws,
                          seed=fold_seed(seed, fold))  # fmt: skip
            fs_rows.append(fs.assign(seed=seed, fold=fold))
    return rows, fs_rows, chosen_c


def probe_classification(run: ProbeRun) -> tuple[dict[str, Any], list[str]]:
    """A classification probe run: writes ``{linear,knn}_results.json`` / fold and seed metric
    CSVs / ROC PNGs, ``predictions.csv``, ``fewshot.csv`` + ``fewshot_summary.csv`` and
    ``summary.json`` to run.out → (summary, the report lines to print)."""
    import pandas as pd

    from slidefm.eval.probes import FEW_SHOT_KS
    from slidefm.eval.report import write_json
    from slidefm.eval.targets import check_class_sizes, encode_targets, make_task
    from slidefm.io.manifest import read_cohort_manifest, strip_labels

    if not run.label:
        raise ValueError("probe needs --label COL (or --task survival --time COL --event COL)")
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(run.probes) - set(PROBES))
    if unknown:
        raise ValueError(f"Unknown probe(s) {unknown}; choose from {', '.join(PROBES)}")
    shots = list(run.shots) if run.shots else list(FEW_SHOT_KS)
    df = strip_labels(read_cohort_manifest(run.manifest, run.slide_level_only), [run.label])
    task = make_task(df, [run.label])
    check_class_sizes(df, task)
    y = encode_targets(df, task)
    x, attrs = _inputs(run, df)
    strata = [str(s) for s in df[run.label]]
    splits = run_splits(df, strata, run.seeds, out / "splits.csv", run.splits, run.folds)
    rows, fs_rows, chosen_c = _fold_probes(run, x, y, df, splits, task, shots)
    meta = _meta(run, attrs, command="probe", task=task.to_dict(),
                 slide_level_only=bool(run.slide_level_only),
                 slidefm_version=slidefm.__version__)  # fmt: skip
    summary: dict = {**meta, "probes": {}}
    lines = _report(run, out, task, meta, summary, rows, chosen_c)
    if fs_rows:
        lines += _report_fewshot(out, summary, pd.concat(fs_rows, ignore_index=True))
    write_json(summary, out / "summary.json")
    return summary, lines


def _report(run: ProbeRun, out: Path, task, meta, summary, rows, chosen_c) -> list[str]:
    """The linear / kNN result files and ``predictions.csv``; their summaries into
    ``summary["probes"]``; returns their report lines."""
    import pandas as pd

    from slidefm.eval.report import evaluate_predictions, format_summary, write_csv, write_report
    from slidefm.eval.targets import aggregate_patients

    lines, all_preds = [], []
    for name in ("linear", "knn"):
        if not rows[name]:
            continue
        preds = pd.concat(rows[name], ignore_index=True)
        all_preds.append(preds.assign(probe=name))
        scored = aggregate_patients(preds, task) if run.patient_level else preds
        result = evaluate_predictions(scored, task, n_boot=run.n_boot, seed=run.seed)
        extra = {"probe": name, "level": "patient" if run.patient_level else "slide"}
        extra.update({"chosen_C": chosen_c} if name == "linear" else {"k": run.k})
        write_report(out, scored, task, result, {**meta, **extra}, prefix=f"{name}_")
        summary["probes"][name] = result["summary"]
        lines += [f"[{name}]", format_summary(result)]
    if all_preds:
        write_csv(pd.concat(all_preds, ignore_index=True), out / "predictions.csv")
    return lines


def _report_fewshot(out: Path, summary: dict, fs: pd.DataFrame) -> list[str]:
    """``fewshot.csv`` (every draw) and ``fewshot_summary.csv`` (mean ± sd per k)."""
    from slidefm.eval.probes import mean_sd
    from slidefm.eval.report import write_csv

    write_csv(fs, out / "fewshot.csv")
    fs_sum = mean_sd(fs, ["k"])
    write_csv(fs_sum, out / "fewshot_summary.csv")
    summary["probes"]["fewshot"] = fs_sum.to_dict(orient="records")
    return ["[fewshot] (mean ± sd over draws × folds × seeds)"] + [
        f"  k={r.k:>2}: AUROC {r.auroc_mean:.3f} ± {r.auroc_sd:.3f}   balanced acc {r.balanced_accuracy_mean:.3f} ± {r.balanced_accuracy_sd:.3f}   (n={r.n})"
        for r in fs_sum.itertuples()
    ]


def probe_survival(run: ProbeRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Cox probe run → (result, meta): ``cox_results.json``, ``cox_fold_metrics.csv``,
    ``cox_seed_metrics.csv``, ``cox_km_seed<s>.png``, ``predictions.csv`` (slides) and
    ``patient_predictions.csv`` (out-of-fold risk per patient) in run.out."""
    import pandas as pd
    from tqdm import tqdm

    from slidefm.eval.probes import cox_probe
    from slidefm.eval.survival import (
        write_survival_report,
    )
    from slidefm.io.manifest import check_survival, read_cohort_manifest

    if not run.time or not run.event:
        raise ValueError("--task survival needs --time COL and --event COL")
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    df = read_cohort_manifest(run.manifest, run.slide_level_only)
    time, event = check_survival(df, run.time, run.event)
    x, attrs = _inputs(run, df)
    strata = [str(s) for s in event]
    splits = run_splits(df, strata, run.seeds, out / "splits.csv", run.splits, run.folds)
    rows, chosen = [], []
    folds = tqdm(iter_folds(splits, df, require=()), total=n_folds_of(splits), desc="cox probe",
                 unit="fold", disable=not run.progress)  # fmt: skip
    for seed, fold, idx in folds:
        tr, va, te = idx["train"], idx["val"], idx["test"]
        res = cox_probe(x[tr], time[tr], event[tr], x[va], time[va], event[va], x[te])
        chosen.append({"seed": seed, "fold": fold, "penalty": res.best_penalty})
        rows.append(survival_fold_frame(df, te, seed, fold, time, event, res.risk, res.fit_risk))
    preds = pd.concat(rows, ignore_index=True)
    patients, result = score_survival(preds, out, run.horizons, run.n_boot, run.seed)
    meta = _meta(run, attrs, command="probe --task survival", probe="cox", time=run.time,
                 event=run.event, level="patient")  # fmt: skip
    meta.update(chosen_penalty=chosen, slidefm_version=slidefm.__version__)
    write_survival_report(out, patients, result, meta, prefix="cox_", time_label=run.time)
    return result, meta
