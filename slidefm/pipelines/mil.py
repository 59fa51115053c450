"""``slidefm mil train`` / ``slidefm mil predict``: biomarker prediction from tile-feature bags.

train: patient-grouped, label-stratified K-fold CV over seeds, one early-stopped model per
(seed, fold), out-of-fold metrics with patient-bootstrap 95% CIs (``eval.mil_cv``; survival
with ``--task survival``). predict: a fold checkpoint or a run folder (probabilities averaged
over its fold models) → predictions CSV, with metrics when the manifest has the label
(``eval.inference.predict_manifest``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slidefm.models import MIL_MODELS
from slidefm.options import add_overwrite, add_slide_level_only

if TYPE_CHECKING:
    from slidefm.train.mil import MILConfig

# Flags that set a MILConfig field (beaten by --set, see slidefm.config.apply_flags).
FLAG_TO_FIELD = {"model": str, "epochs": int, "lr": float, "batch_size": int, "max_tiles": int,
                 "balance": str, "slide_encoder": str, "slide_encoder_weights": str,
                 "device": str}  # fmt: skip
FLAG_HELP = {"slide_encoder": "a `slidefm pretrain` checkpoint, or a registry name "
             "(`slidefm slide-encoders list`: gigapath, titan, chief, a slidefm config)",
             "slide_encoder_weights": "with a registry name: random | hub | PATH (the published "
             "file or snapshot folder)"}  # fmt: skip


def config_from_args(args: argparse.Namespace) -> MILConfig:
    """YAML < explicit flags < ``--set``, as every command (``slidefm.config``)."""
    from slidefm.config import flag_values, load_config
    from slidefm.train.mil import MILConfig

    default = "survival" if getattr(args, "task", None) == "survival" else "default"
    flags = flag_values(args, list(FLAG_TO_FIELD))
    if getattr(args, "finetune", False):
        flags["freeze_encoder"] = False
    return load_config(MILConfig, args.config or default, args.overrides, "mil", flags)


def run_train(args: argparse.Namespace) -> int:
    from slidefm.eval.mil_cv import MILRun, report_lines, train_mil, train_mil_survival
    from slidefm.eval.protocol import parse_labels, parse_list, parse_seeds

    survival = args.task == "survival"
    if not survival and not args.label:
        raise ValueError("mil train needs --label COL (or --task survival --time COL --event COL)")
    cfg = config_from_args(args)
    run = MILRun(args.manifest, args.features, args.out, tuple(parse_labels(args.label)),
                 tuple(parse_list(args.classes) or ()) or None, tuple(parse_seeds(args.seeds)),
                 args.folds, args.splits, args.patient_level, args.slide_level_only,
                 args.overwrite, not args.no_progress, args.seed,
                 args.time if survival else None, args.event, args.horizons)  # fmt: skip
    result, meta = (train_mil_survival if survival else train_mil)(run, cfg)
    print("\n".join(report_lines(result, meta)))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from slidefm.eval.inference import predict_manifest
    from slidefm.eval.report import evaluate_predictions, format_summary, write_csv, write_json

    preds, task, files, has_label = predict_manifest(args.checkpoint, args.manifest,
                                                     args.features, args.device,
                                                     args.patient_level, not args.no_progress)  # fmt: skip
    out = Path(args.out)
    write_csv(preds, out)
    print(f"{len(preds)} prediction(s) from {len(files)} model(s) → {out}")
    scored, seen = preds, preds["seen_in_training"]
    if seen.any():
        note = f"WARNING: {int(seen.sum())} of {len(preds)} rows were in these models' training/validation data"
        if not args.include_seen:
            scored = preds[~seen]
        print(f"{note} and are scored (--include-seen): the metrics overestimate performance"
              if args.include_seen else
              f"{note} (seen_in_training in the CSV): metrics cover the {len(scored)} held-out "
              "rows only (--include-seen scores all)")  # fmt: skip
    y_s = scored[task.target_columns].to_numpy() if has_label else np.zeros((0, 1))
    if has_label and len(np.unique(y_s[:, 0])) > 1:
        res = evaluate_predictions(scored.drop(columns=["seen_in_training"]).assign(seed=0, fold=0),
                                   task, n_boot=1000, seed=args.seed)  # fmt: skip
        write_json({"command": "mil predict", "checkpoints": [str(f) for f in files],
                    "seed": args.seed, "scored_rows": len(scored),
                    "seen_rows_scored": int(scored["seen_in_training"].sum()), **res},
                   out.with_suffix(".metrics.json"))  # fmt: skip
        print(format_summary(res))
    elif has_label:
        print("no metrics: the held-out rows do not have both classes")
    return 0


def _train_parser(t: argparse.ArgumentParser) -> None:
    a = t.add_argument
    a("--manifest", required=True, help="CSV with slide_id, case_id and the label column(s)")
    a("--features", required=True, help="folder of <slide_id>.h5 feature files")
    a("--label", help="label column, or COL1,COL2,… (0/1 each) for multi-label")
    a("--task", choices=("classification", "survival"), default="classification",
      help="survival: right-censored follow-up from --time/--event (configs/mil/survival.yaml)")  # fmt: skip
    a("--time", help="survival: follow-up time column (days, months, …; ≥ 0)")
    a("--event", help="survival: event column (1 = event, 0 = censored)")
    a("--horizons", help="survival: comma-separated times for time-dependent AUC (default: event-time quartiles)")  # fmt: skip
    a("--classes", help="comma-separated class order; other label values are an error")
    a("--model", choices=MIL_MODELS, default=None)
    a("--folds", type=int, default=5, help="K for cross-validation; 0 = use the manifest's split column")  # fmt: skip
    a("--seeds", default="0", help="comma-separated seeds (splits and initialisation), e.g. 0,1,2")
    a("--splits", help="reuse a saved splits.csv (from another run) instead of making one")
    a("--patient-level", action="store_true", help="aggregate slide predictions per case_id before scoring")  # fmt: skip
    a("--out", required=True, help="output folder")
    add_slide_level_only(t)
    for name, typ in FLAG_TO_FIELD.items():
        if name != "model":
            a(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=FLAG_HELP.get(name, f"config {name}"))  # fmt: skip
    a("--finetune", action="store_true", help="slide_encoder: fine-tune the encoder too")
    a("--no-progress", action="store_true")
    add_overwrite(t)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

    p = sub.add_parser("mil", help="MIL biomarker prediction: cross-validated training and prediction")  # fmt: skip
    msub = p.add_subparsers(dest="mil_command", metavar="{train,predict}")
    msub.required = True
    t = msub.add_parser("train", help="K-fold CV (patient-grouped) over seeds → metrics with 95%% CIs")  # fmt: skip
    _train_parser(t)
    add_common(t, "mil")
    t.set_defaults(func=run_train)

    q = msub.add_parser("predict", help="predict slides with a trained model (or all fold models of a run)")  # fmt: skip
    q.add_argument("--checkpoint", required=True, help="model.pt of one fold, or a `mil train` output folder")  # fmt: skip
    q.add_argument("--manifest", required=True)
    q.add_argument("--features", required=True)
    q.add_argument("--out", required=True, help="predictions CSV")
    q.add_argument("--patient-level", action="store_true")
    q.add_argument("--include-seen", action="store_true",
                   help="score rows the models trained on too (left out of the metrics by default)")  # fmt: skip
    q.add_argument("--device", default="auto")
    q.add_argument("--no-progress", action="store_true")
    add_common(q)
    q.set_defaults(func=run_predict)
