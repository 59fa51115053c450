"""``slidefm probe``: how well frozen slide embeddings predict a label, one protocol for every
model (eva-style): the same patient-grouped folds and seeds as ``slidefm mil train`` (pass its
``splits.csv`` to compare on identical partitions), and three probes:

- ``linear``: logistic regression, C chosen on the validation split;
- ``knn``: k = 20 nearest neighbours by cosine similarity (train + val as the memory);
- ``fewshot``: k ∈ {1, 2, 4, 8, 16} slides per class drawn from train + val, many draws,
  SimpleShot prototypes; reported as mean ± sd over draws, folds and seeds.

Outputs: ``{linear,knn}_results.json`` / ``_fold_metrics.csv`` / ``_seed_metrics.csv`` / ROC
PNGs, ``predictions.csv``, ``fewshot.csv`` (every draw) + ``fewshot_summary.csv``,
``summary.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import slidefm
from slidefm.options import SLIDE_LEVEL_RISK, add_slide_level_only

if TYPE_CHECKING:  # heavy modules load inside run() (`slidefm --help` stays fast)
    import pandas as pd

PROBES = ("linear", "knn", "fewshot")


def align_embeddings(df: pd.DataFrame, slide_ids: list[str], emb: np.ndarray) -> np.ndarray:
    """Rows of ``emb`` in manifest order; a manifest slide without an embedding is an error."""
    from slidefm.io.manifest import ManifestError

    pos = {str(s): i for i, s in enumerate(slide_ids)}
    missing = [s for s in df["slide_id"].astype(str) if s not in pos]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ManifestError(
            f"{len(missing)} manifest slide(s) have no embedding: {', '.join(missing[:5])}{more}; run `slidefm embed-slides` on them or drop them"
        )
    return np.asarray(emb, dtype=np.float64)[[pos[s] for s in df["slide_id"].astype(str)]]


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm import tqdm

    from slidefm.eval.probes import FEW_SHOT_KS, few_shot, knn_probe, linear_probe, mean_sd
    from slidefm.eval.report import (
        evaluate_predictions,
        format_summary,
        write_csv,
        write_json,
        write_report,
    )
    from slidefm.eval.splits import fold_indices, probe_splits
    from slidefm.eval.targets import (
        aggregate_patients,
        check_class_sizes,
        encode_targets,
        make_task,
        prediction_frame,
    )
    from slidefm.io.embeddings import read_embeddings
    from slidefm.io.manifest import read_cohort_manifest, strip_labels

    if getattr(args, "task", "classification") == "survival":
        from slidefm.pipelines.probe_survival import run_survival_probe

        return run_survival_probe(args)
    if not args.label:
        raise ValueError("probe needs --label COL (or --task survival --time COL --event COL)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"Unknown probe(s) {unknown}; choose from {', '.join(PROBES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    shots = [int(s) for s in args.shots.split(",")] if args.shots else list(FEW_SHOT_KS)
    df = strip_labels(read_cohort_manifest(args.manifest, args.slide_level_only), [args.label])
    task = make_task(df, [args.label])
    check_class_sizes(df, task)
    y = encode_targets(df, task)
    ids, emb, emb_attrs = read_embeddings(args.embeddings)
    x = align_embeddings(df, list(ids), emb)
    splits = probe_splits(df, df[args.label], seeds, out / "splits.csv", args.splits, args.folds)
    pos = {s: i for i, s in enumerate(df["slide_id"].astype(str))}
    rows: dict[str, list[pd.DataFrame]] = {"linear": [], "knn": []}
    fs_rows, chosen_c = [], []
    groups = list(splits.groupby(["seed", "fold"], sort=True))
    for (seed, fold), part in tqdm(groups, desc="probing", unit="fold", disable=args.no_progress):
        idx = fold_indices(part, pos)
        trval = np.concatenate([idx["train"], idx["val"]])
        test, y_test = df.iloc[idx["test"]], y[idx["test"]]
        if "linear" in probes:
            res = linear_probe(
                x[idx["train"]],
                y[idx["train"]],
                x[idx["val"]],
                y[idx["val"]],
                x[idx["test"]],
                task.num_classes,
                seed=int(seed),
            )
            chosen_c.append({"seed": int(seed), "fold": int(fold), "C": res.best_c})
            rows["linear"].append(prediction_frame(test, y_test, task, seed, fold, res.proba))
        if "knn" in probes:
            proba = knn_probe(x[trval], y[trval], x[idx["test"]], task.num_classes, k=args.k)
            rows["knn"].append(prediction_frame(test, y_test, task, seed, fold, proba))
        if "fewshot" in probes:
            fs = few_shot(
                x[trval],
                y[trval],
                x[idx["test"]],
                y_test,
                task.num_classes,
                shots,
                args.draws,
                seed=int(seed) * 1000 + int(fold),
            )
            fs_rows.append(fs.assign(seed=int(seed), fold=int(fold)))
    meta = {
        "command": "probe",
        "random_weights": str(emb_attrs.get("checkpoint_sha256", "")) == "random",
        "embeddings": str(args.embeddings),
        "embedding_attrs": {k: str(v) for k, v in emb_attrs.items()},
        "task": task.to_dict(),
        "seeds": seeds,
        "seed": args.seed,
        "slide_level_only": bool(args.slide_level_only),
        "slidefm_version": slidefm.__version__,
    }
    summary: dict = {**meta, "probes": {}}
    all_preds = []
    for name in ("linear", "knn"):
        if not rows[name]:
            continue
        preds = pd.concat(rows[name], ignore_index=True)
        all_preds.append(preds.assign(probe=name))
        scored = aggregate_patients(preds, task) if args.patient_level else preds
        result = evaluate_predictions(scored, task, n_boot=args.n_boot, seed=args.seed)
        extra = {"probe": name, "level": "patient" if args.patient_level else "slide"}
        if name == "linear":
            extra["chosen_C"] = chosen_c
        if name == "knn":
            extra["k"] = args.k
        write_report(out, scored, task, result, {**meta, **extra}, prefix=f"{name}_")
        summary["probes"][name] = result["summary"]
        print(f"[{name}]")
        print(format_summary(result))
    if all_preds:
        write_csv(pd.concat(all_preds, ignore_index=True), out / "predictions.csv")
    if fs_rows:
        fs = pd.concat(fs_rows, ignore_index=True)
        write_csv(fs, out / "fewshot.csv")
        fs_sum = mean_sd(fs, ["k"])
        write_csv(fs_sum, out / "fewshot_summary.csv")
        summary["probes"]["fewshot"] = fs_sum.to_dict(orient="records")
        print("[fewshot] (mean ± sd over draws × folds × seeds)")
        for r in fs_sum.itertuples():
            print(
                f"  k={r.k:>2}: AUROC {r.auroc_mean:.3f} ± {r.auroc_sd:.3f}   balanced acc {r.balanced_accuracy_mean:.3f} ± {r.balanced_accuracy_sd:.3f}   (n={r.n})"
            )
    write_json(summary, out / "summary.json")
    if args.slide_level_only:
        print(f"NOTE: --slide-level-only: {SLIDE_LEVEL_RISK}")
    if str(emb_attrs.get("checkpoint_sha256", "")) == "random":
        print("NOTE: these embeddings come from a RANDOMLY INITIALISED slide encoder")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

    p = sub.add_parser("probe", help="linear / kNN / few-shot probes on slide embeddings, with CIs")
    p.add_argument(
        "--embeddings", required=True, help="slide_embeddings.h5 from `slidefm embed-slides`"
    )
    p.add_argument(
        "--manifest", required=True, help="CSV with slide_id, case_id and the label column"
    )
    p.add_argument("--label", help="label column (classification)")
    p.add_argument(
        "--task",
        choices=("classification", "survival"),
        default="classification",
        help="survival: an L2-penalised Cox model on the embeddings (--time, --event)",
    )
    p.add_argument("--time", help="survival: follow-up time column (≥ 0)")
    p.add_argument("--event", help="survival: event column (1 = event, 0 = censored)")
    p.add_argument(
        "--horizons", help="survival: times for time-dependent AUC (default: event-time quartiles)"
    )
    add_slide_level_only(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--probes",
        default="linear,knn,fewshot",
        help="comma-separated subset of linear,knn,fewshot",
    )
    p.add_argument("--folds", type=int, default=5, help="K for CV; 0 = the manifest's split column")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--splits", help="reuse a saved splits.csv (e.g. from `slidefm mil train`)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--shots", help="few-shot k per class, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--draws", type=int, default=50, help="few-shot draws per k, fold and seed")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for CIs")
    p.add_argument(
        "--patient-level", action="store_true", help="aggregate slide probabilities per case_id"
    )
    p.add_argument("--no-progress", action="store_true")
    add_common(p)
    p.set_defaults(func=run)
