"""``slidefm mil train --task survival``: risk models on tile-feature bags with right-censored
follow-up, in the same protocol as classification (``pipelines/mil.py``).

Manifest + ``--time COL --event COL`` → patient-grouped K-fold CV stratified by event, over
seeds (``splits.csv`` saved and reused); per (seed, fold) one model (ABMIL, TransMIL, mean/max
pooling or a slide encoder, frozen or fine-tuned) trained with the Cox partial likelihood or the
discrete-time NLL (``survival_loss``), early-stopped on validation patients. Its risks on the
test fold are standardised by its risks on the fold's training + validation slides
(``eval.survival.normalise_fold_risk``) so folds can be pooled.

Outputs: ``predictions.csv`` (slide, out-of-fold), ``patient_predictions.csv`` (per patient:
time, event, out-of-fold ``risk``), ``results.json`` (C-index and time-dependent AUC with
patient-bootstrap 95% CIs, per fold / seed / overall, log-rank p of the median split),
``fold_metrics.csv``, ``seed_metrics.csv``, ``km_seed<s>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import slidefm
from slidefm.config import config_hash
from slidefm.eval.report import format_summary, write_csv, write_json
from slidefm.eval.survival import (
    default_horizons,
    evaluate_survival,
    normalise_fold_risk,
    patient_risks,
    write_survival_report,
)
from slidefm.eval.targets import Task, check_feature_files
from slidefm.io.manifest import check_survival, read_cohort_manifest
from slidefm.models.mil import save_mil_checkpoint, slide_encoder_weights
from slidefm.models.survival import SurvivalObjective
from slidefm.pipelines.mil import (
    BagDataset,
    Bags,
    MILConfig,
    build_splits,
    config_from_args,
    finished_fold,
    fold_split,
    load_bags,
    parse_seeds,
    predict_bags,
    provenance_notes,
    train_fold,
)

log = logging.getLogger(__name__)


def event_task(event_col: str) -> Task:
    """The event column as a binary 'task', so the one split builder stratifies folds by it."""
    return Task((event_col,), ("0", "1"), False)


def parse_horizons(s: str | None, time: np.ndarray, event: np.ndarray) -> list[float]:
    if not s:
        return default_horizons(time, event)
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--horizons must be comma-separated numbers, got {s!r}") from e


def fold_risk(
    model, objective: SurvivalObjective, bags: Bags, rows: np.ndarray, y: np.ndarray, cfg: MILConfig
) -> np.ndarray:
    """(len(rows),) risks of whole bags ``rows`` under a trained fold model."""
    device = next(model.parameters()).device
    ds = BagDataset(bags, rows, y)
    return objective.risk(predict_bags(model, ds, cfg.eval_batch_size, device, False, raw=True))


def run_survival_cv(
    df: pd.DataFrame,
    time: np.ndarray,
    event: np.ndarray,
    bags: Bags,
    splits: pd.DataFrame,
    cfg: MILConfig,
    out: Path,
    progress: bool = True,
) -> pd.DataFrame:
    """Train and test every (seed, fold) → slide table ``seed, fold, slide_id, case_id, time,
    event, risk_raw, risk`` (``risk`` normalised per fold). A fold finished with the same
    config and features is read back instead of retrained."""
    pos = {s: i for i, s in enumerate(df["slide_id"].astype(str))}
    if bags.slide_ids != df["slide_id"].astype(str).tolist():
        raise RuntimeError("bags are not in manifest order")
    spec = {"loss": cfg.survival_loss, "bins": cfg.survival_bins, "alpha": cfg.survival_alpha}
    chash = config_hash(
        {"config": dataclasses.asdict(cfg), "survival": spec, "features": bags.attrs}
    )
    task = event_task("event")
    all_preds = []
    groups = list(splits.groupby(["seed", "fold"], sort=True))
    bar = tqdm(groups, desc=f"survival {cfg.model}", unit="fold", disable=not progress)
    for (seed, fold), part in bar:
        fold_dir = out / f"seed{seed}" / f"fold{fold}"
        finished = finished_fold(fold_dir, chash)
        if finished is not None:
            all_preds.append(finished)
            continue
        idx = fold_split(part, pos, seed, fold)
        if event[idx["train"]].sum() == 0:
            raise ValueError(f"seed {seed} fold {fold}: no event among the training patients")
        objective = SurvivalObjective.fit(
            cfg.survival_loss,
            time[idx["train"]],
            event[idx["train"]],
            cfg.survival_bins,
            cfg.survival_alpha,
        )
        y = objective.targets(time, event)
        model, meta = train_fold(
            bags, y, idx, task, cfg, fold_dir, int(seed) * 1000 + int(fold), objective=objective
        )

        fit_rows = np.concatenate([idx["train"], idx["val"]])
        raw = fold_risk(model, objective, bags, idx["test"], y, cfg)
        test = df.iloc[idx["test"]]
        preds = pd.DataFrame(
            {
                "seed": int(seed),
                "fold": int(fold),
                "slide_id": test["slide_id"].astype(str).to_numpy(),
                "case_id": test["case_id"].astype(str).to_numpy(),
                "time": time[idx["test"]],
                "event": event[idx["test"]],
                "risk_raw": raw,
                "risk": normalise_fold_risk(
                    raw, fold_risk(model, objective, bags, fit_rows, y, cfg)
                ),
            }
        )
        meta.update(
            seed=int(seed),
            fold=int(fold),
            config=dataclasses.asdict(cfg),
            config_hash=chash,
            features=bags.attrs,
        )
        save_mil_checkpoint(fold_dir / "model.pt", model, meta)
        write_json(meta, fold_dir / "meta.json")
        write_csv(preds, fold_dir / "predictions.csv")  # last: it marks the fold finished
        all_preds.append(preds)
    return pd.concat(all_preds, ignore_index=True)


def run_train_survival(args: argparse.Namespace) -> int:
    if not args.time or not args.event:
        raise ValueError("--task survival needs --time COL and --event COL")
    cfg = config_from_args(args)
    cfg.validate()
    SurvivalObjective(cfg.survival_loss, (0.0, np.inf))  # validates the loss name early
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds)
    df = read_cohort_manifest(args.manifest, getattr(args, "slide_level_only", False))
    time, event = check_survival(df, args.time, args.event)
    paths = check_feature_files(df, args.features)
    splits = build_splits(
        df.assign(**{args.event: event}), event_task(args.event), args, cfg, seeds, out
    )
    bags = load_bags(paths, progress=not args.no_progress, cache_gb=cfg.cache_gb)
    enc_weights = slide_encoder_weights(cfg.slide_encoder) if cfg.model == "slide_encoder" else None
    preds = run_survival_cv(df, time, event, bags, splits, cfg, out, not args.no_progress)
    write_csv(preds, out / "predictions.csv")
    patients = patient_risks(preds)
    write_csv(patients, out / "patient_predictions.csv")
    first = patients[patients["seed"] == patients["seed"].min()]
    horizons = parse_horizons(args.horizons, first["time"].to_numpy(), first["event"].to_numpy())
    result = evaluate_survival(patients, horizons, n_boot=cfg.n_boot, seed=args.seed)
    notes = provenance_notes(bags, cfg, enc_weights)
    meta = {
        "command": "mil train --task survival",
        "model": cfg.model,
        "survival_loss": cfg.survival_loss,
        "time": args.time,
        "event": args.event,
        "level": "patient",
        "seeds": seeds,
        "seed": args.seed,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "features": bags.attrs,
        "risk": "per fold: (risk − median) / sd of the fold model's risks on its training + validation slides; patient = mean over slides",
        "notes": notes,
        "slidefm_version": slidefm.__version__,
    }
    write_survival_report(out, patients, result, meta, time_label=args.time)
    print(
        f"{cfg.model} survival ({cfg.survival_loss}) on {args.time}/{args.event}: "
        f"{result['n_seeds']} seed(s) × {result['n_folds']} fold(s), "
        f"{result['n_slides_or_patients']} patients, {result['n_events']} events"
    )
    print(format_summary(result))
    for s in result["per_seed"]:
        print(f"  seed {s['seed']}: median-split log-rank p = {s['logrank_p']:.3g}")
    for n in notes:
        print(f"NOTE: {n}")
    print(f"results: {out / 'results.json'}")
    return 0
