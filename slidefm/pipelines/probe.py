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

from slidefm.options import SLIDE_LEVEL_RISK, add_slide_level_only


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from slidefm.eval.probe_cv import ProbeRun, probe_classification, probe_survival
    from slidefm.eval.report import format_summary

    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    run = ProbeRun(args.embeddings, args.manifest, args.out, args.label,
                   tuple(p.strip() for p in args.probes.split(",") if p.strip()), ints(args.seeds),
                   args.folds, args.splits, args.k, ints(args.shots) if args.shots else None,
                   args.draws, args.n_boot, args.patient_level, args.slide_level_only, args.seed,
                   not args.no_progress, args.time, args.event, args.horizons)  # fmt: skip
    if args.task == "survival":
        result, meta = probe_survival(run)
        print(f"[cox] {result['n_slides_or_patients']} patients, {result['n_events']} events")
        print(format_summary(result))
        for s in result["per_seed"]:
            print(f"  seed {s['seed']}: median-split log-rank p = {s['logrank_p']:.3g}")
        if meta["random_weights"]:
            print("NOTE: these embeddings come from a RANDOMLY INITIALISED slide encoder")
        return int(np.isnan(result["summary"]["c_index"]["value"]))
    summary, lines = probe_classification(run)
    print("\n".join(lines))
    if args.slide_level_only:
        print(f"NOTE: --slide-level-only: {SLIDE_LEVEL_RISK}")
    if summary["random_weights"]:
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
