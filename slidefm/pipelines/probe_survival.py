"""``slidefm probe --task survival``: an L2-penalised Cox model on frozen slide embeddings,
the penalty chosen by validation C-index, in the probe protocol (patient-grouped folds
stratified by event, seeds, saved splits; pass a ``mil train`` splits.csv to compare on the
same partitions). Outputs as ``mil train --task survival``: ``cox_results.json``,
``cox_fold_metrics.csv``, ``cox_seed_metrics.csv``, ``cox_km_seed<s>.png``,
``predictions.csv`` (slides) and ``patient_predictions.csv`` (out-of-fold risk per patient).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import slidefm
from slidefm.eval.probes import cox_probe
from slidefm.eval.report import format_summary, write_csv
from slidefm.eval.splits import fold_indices, probe_splits
from slidefm.eval.survival import (
    evaluate_survival,
    normalise_fold_risk,
    patient_risks,
    write_survival_report,
)
from slidefm.io.manifest import check_survival, read_cohort_manifest
from slidefm.pipelines.mil_survival import parse_horizons


def run_survival_probe(args: argparse.Namespace) -> int:
    from slidefm.io.embeddings import read_embeddings
    from slidefm.pipelines.probe import align_embeddings

    if not args.time or not args.event:
        raise ValueError("--task survival needs --time COL and --event COL")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    df = read_cohort_manifest(args.manifest, getattr(args, "slide_level_only", False))
    time, event = check_survival(df, args.time, args.event)
    ids, emb, emb_attrs = read_embeddings(args.embeddings)
    x = align_embeddings(df, list(ids), emb)
    splits = probe_splits(df, event, seeds, out / "splits.csv", args.splits, args.folds)
    pos = {s: i for i, s in enumerate(df["slide_id"].astype(str))}
    rows, chosen = [], []
    groups = list(splits.groupby(["seed", "fold"], sort=True))
    for (seed, fold), part in tqdm(groups, desc="cox probe", unit="fold", disable=args.no_progress):
        idx = fold_indices(part, pos)
        tr, va, te = idx["train"], idx["val"], idx["test"]
        res = cox_probe(x[tr], time[tr], event[tr], x[va], time[va], event[va], x[te])
        chosen.append({"seed": int(seed), "fold": int(fold), "penalty": res.best_penalty})
        rows.append(
            pd.DataFrame(
                {
                    "seed": int(seed),
                    "fold": int(fold),
                    "slide_id": df["slide_id"].iloc[te].astype(str).to_numpy(),
                    "case_id": df["case_id"].iloc[te].astype(str).to_numpy(),
                    "time": time[te],
                    "event": event[te],
                    "risk_raw": res.risk,
                    "risk": normalise_fold_risk(res.risk, res.fit_risk),
                }
            )
        )
    preds = pd.concat(rows, ignore_index=True)
    write_csv(preds, out / "predictions.csv")
    patients = patient_risks(preds)
    write_csv(patients, out / "patient_predictions.csv")
    first = patients[patients["seed"] == patients["seed"].min()]
    horizons = parse_horizons(args.horizons, first["time"].to_numpy(), first["event"].to_numpy())
    result = evaluate_survival(patients, horizons, n_boot=args.n_boot, seed=args.seed)
    random_weights = str(emb_attrs.get("checkpoint_sha256", "")) == "random"
    meta = {
        "command": "probe --task survival",
        "probe": "cox",
        "random_weights": random_weights,
        "embeddings": str(args.embeddings),
        "embedding_attrs": {k: str(v) for k, v in emb_attrs.items()},
        "time": args.time,
        "event": args.event,
        "level": "patient",
        "seeds": seeds,
        "seed": args.seed,
        "chosen_penalty": chosen,
        "slidefm_version": slidefm.__version__,
    }
    write_survival_report(out, patients, result, meta, prefix="cox_", time_label=args.time)
    print(f"[cox] {result['n_slides_or_patients']} patients, {result['n_events']} events")
    print(format_summary(result))
    for s in result["per_seed"]:
        print(f"  seed {s['seed']}: median-split log-rank p = {s['logrank_p']:.3g}")
    if random_weights:
        print("NOTE: these embeddings come from a RANDOMLY INITIALISED slide encoder")
    return int(np.isnan(result["summary"]["c_index"]["value"]))
