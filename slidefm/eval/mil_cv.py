"""MIL in the cross-validation protocol (``eval.protocol``): ``slidefm mil train``.

Classification: manifest + feature folder → one model per (seed, fold) (``train.mil``), its
test-fold probabilities pooled out of fold, metrics per fold / seed / overall with
patient-bootstrap 95% CIs, ROC PNGs, results CSV + JSON. Survival: the same protocol with a
Cox / discrete-time objective; each fold's test risks are standardised by its risks on the
fold's training + validation slides (``eval.survival.normalise_fold_risk``) so folds pool.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import slidefm
from slidefm.config import config_hash
from slidefm.eval.protocol import (
    event_task,
    finished_fold,
    fold_seed,
    iter_folds,
    label_strata,
    n_folds_of,
    run_splits,
    score_survival,
    survival_fold_frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from slidefm.eval.targets import Task
    from slidefm.io.bags import Bags
    from slidefm.train.mil import MILConfig

log = logging.getLogger(__name__)

# What ``mil train`` writes into --out (discarded by --overwrite).
MIL_OUTPUTS = (
    "seed*",
    "splits.csv",
    "predictions.csv",
    "patient_predictions.csv",
    "*fold_metrics.csv",
    "*seed_metrics.csv",
    "*results.json",
    "*roc_seed*.png",
)


@dataclasses.dataclass(frozen=True)
class MILRun:
    """The inputs of one ``mil train`` run besides the model config."""

    manifest: str
    features: str
    out: str
    labels: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    folds: int = 5
    splits: str | None = None
    patient_level: bool = False
    slide_level_only: bool = False
    overwrite: bool = False
    progress: bool = True
    seed: int = 0  # bootstrap
    time: str | None = None  # survival: follow-up and event columns, AUC horizons
    event: str | None = None
    horizons: str | None = None


def claim_mil_out(
    out: Path, df: pd.DataFrame, task: Task, cfg: MILConfig, paths: list[Path], overwrite: bool
) -> dict[str, Any]:
    """``--out`` belongs to one (config, task, feature files + manifest rows): a finished fold
    is reused only by the same run (more --seeds extend it), another one is refused unless
    ``overwrite``. Records the identity in run_config.json; returns it."""
    from slidefm.train.run_dir import RUN_CONFIG, claim_run_dir, inputs_hash, run_identity
    from slidefm.train.run_dir import write_json as write_run_json

    cols = ["slide_id", "case_id", *task.labels]
    rows = df[cols].astype(str).values.tolist()
    chash = config_hash({"config": dataclasses.asdict(cfg), "task": task.to_dict()})
    identity = run_identity(chash, inputs_hash(paths, rows), None)
    claim_run_dir(out, identity, overwrite, MIL_OUTPUTS)
    write_run_json(out / RUN_CONFIG, {"command": "mil train", "identity": identity})
    return identity


def provenance_notes(bags: Bags, cfg: MILConfig, enc_weights: str | None) -> list[str]:
    """Warnings that must travel with the numbers (random weights are never pretrained results)."""
    notes = []
    if str(bags.attrs.get("encoder_weights", "")).startswith("random"):
        notes.append(
            f"tile features come from a RANDOMLY INITIALISED {bags.attrs.get('encoder')} encoder, not pretrained weights"
        )
    if cfg.model == "slide_encoder" and enc_weights == "random":
        notes.append(f"slide encoder {cfg.slide_encoder!r} is RANDOMLY INITIALISED (no checkpoint)")
    return notes


FoldFit = Callable[[int, int, dict[str, np.ndarray], Path], tuple[Any, dict, "pd.DataFrame"]]


def cv_loop(df: pd.DataFrame, bags: Bags, splits: pd.DataFrame, out: Path, chash: str,
            fit: FoldFit, cfg: MILConfig, progress: bool) -> pd.DataFrame:  # fmt: skip
    """Every (seed, fold): read back a finished one, else ``fit(seed, fold, idx, fold_dir)`` →
    (model, meta, test predictions), saved as model.pt + meta.json + predictions.csv (last: it
    marks the fold finished). Returns the pooled out-of-fold table."""
    import pandas as pd
    from tqdm import tqdm

    from slidefm.eval.report import write_csv, write_json
    from slidefm.models.mil import save_mil_checkpoint

    if bags.slide_ids != df["slide_id"].astype(str).tolist():
        raise RuntimeError("bags are not in manifest order")
    ids, cases = df["slide_id"].astype(str), df["case_id"].astype(str)
    all_preds = []
    bar = tqdm(iter_folds(splits, df), total=n_folds_of(splits), desc=f"mil {cfg.model}",
               unit="fold", disable=not progress)  # fmt: skip
    for seed, fold, idx in bar:
        fold_dir = out / f"seed{seed}" / f"fold{fold}"
        finished = finished_fold(fold_dir, chash)
        if finished is not None:
            log.info("seed %s fold %s: done, skipping", seed, fold)
            all_preds.append(finished)
            continue
        model, meta, preds = fit(seed, fold, idx, fold_dir)
        seen = np.concatenate([idx["train"], idx["val"]])  # fitted on, or early-stopped on
        meta.update(seed=seed, fold=fold, config=dataclasses.asdict(cfg), config_hash=chash,
                    features=bags.attrs, train_slide_ids=ids.iloc[seen].tolist(),
                    train_case_ids=sorted(set(cases.iloc[seen])))  # fmt: skip
        save_mil_checkpoint(fold_dir / "model.pt", model, meta)
        write_json(meta, fold_dir / "meta.json")
        write_csv(preds, fold_dir / "predictions.csv")
        all_preds.append(preds)
    return pd.concat(all_preds, ignore_index=True)


def run_cv(df: pd.DataFrame, task: Task, bags: Bags, splits: pd.DataFrame, cfg: MILConfig,
           out: Path, progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Classification: train and test every (seed, fold) → out-of-fold prediction table."""
    from slidefm.eval.inference import predict_bags
    from slidefm.eval.targets import encode_targets, prediction_frame
    from slidefm.io.bags import bag_rows
    from slidefm.train.mil import train_fold

    y = encode_targets(df, task)
    # A finished fold is reused only for the same config, task and feature encoder.
    chash = config_hash(
        {"config": dataclasses.asdict(cfg), "task": task.to_dict(), "features": bags.attrs}
    )

    def fit(seed: int, fold: int, idx: dict[str, np.ndarray], fold_dir: Path):
        model, meta = train_fold(bags, y, idx, task, cfg, fold_dir, fold_seed(seed, fold))
        device = next(model.parameters()).device
        test = bag_rows(bags, idx["test"], y)
        prob = predict_bags(model, test, cfg.eval_batch_size, device, task.multilabel)
        preds = prediction_frame(df.iloc[idx["test"]], y[idx["test"]], task, seed, fold, prob)
        return model, meta, preds

    return cv_loop(df, bags, splits, out, chash, fit, cfg, progress)


def run_survival_cv(df: pd.DataFrame, time: np.ndarray, event: np.ndarray, bags: Bags,
                    splits: pd.DataFrame, cfg: MILConfig, out: Path,
                    progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Survival: every (seed, fold) → slide table ``seed, fold, slide_id, case_id, time,
    event, risk_raw, risk`` (``risk`` normalised per fold)."""

    from slidefm.eval.inference import predict_bags
    from slidefm.io.bags import bag_rows
    from slidefm.models.survival import SurvivalObjective
    from slidefm.train.mil import train_fold

    spec = {"loss": cfg.survival_loss, "bins": cfg.survival_bins, "alpha": cfg.survival_alpha}
    chash = config_hash(
        {"config": dataclasses.asdict(cfg), "survival": spec, "features": bags.attrs}
    )

    def fit(seed: int, fold: int, idx: dict[str, np.ndarray], fold_dir: Path):
        tr = idx["train"]
        if event[tr].sum() == 0:
            raise ValueError(f"seed {seed} fold {fold}: no event among the training patients")
        objective = SurvivalObjective.fit(cfg.survival_loss, time[tr], event[tr],
                                          cfg.survival_bins, cfg.survival_alpha)  # fmt: skip
        y = objective.targets(time, event)
        model, meta = train_fold(bags, y, idx, event_task("event"), cfg, fold_dir,
                                 fold_seed(seed, fold), objective=objective)  # fmt: skip
        device = next(model.parameters()).device

        def risk(rows: np.ndarray) -> np.ndarray:
            logits = predict_bags(model, bag_rows(bags, rows, y), cfg.eval_batch_size, device,
                                  False, raw=True)  # fmt: skip
            return objective.risk(logits)

        te = idx["test"]
        raw = risk(te)  # (test first, as always: each DataLoader draws from the global RNG)
        fit_risk = risk(np.concatenate([tr, idx["val"]]))
        return model, meta, survival_fold_frame(df, te, seed, fold, time, event, raw, fit_risk)

    return cv_loop(df, bags, splits, out, chash, fit, cfg, progress)


def _run_meta(run: MILRun, cfg: MILConfig, bags: Bags, notes: list[str], **extra) -> dict:
    return {**extra, "seeds": list(run.seeds), "seed": run.seed,
            "config": dataclasses.asdict(cfg), "config_hash": config_hash(cfg),
            "features": bags.attrs, "notes": notes,
            "slidefm_version": slidefm.__version__}  # fmt: skip


def check_slide_encoder_inputs(spec: str, path: Path) -> None:
    """A published slide encoder refuses features it was not trained on, as in embed-slides
    (width, recorded tile encoder); checkpoints and slidefm configs check the width when built."""
    from slidefm.eval.embed import check_published_inputs
    from slidefm.io.features import cohort_key, read_attrs
    from slidefm.models.registry import PUBLISHED

    if spec in PUBLISHED:  # attrs and the dataset shape only: nothing is read yet
        check_published_inputs(PUBLISHED[spec], Path(path), read_attrs(path), cohort_key(path)[1])


def _cohort(run: MILRun, cfg: MILConfig, df: pd.DataFrame, strata: list[str], task: Task):
    """(bags, splits, slide-encoder weights) of a run: claim/splits before loading features."""
    from slidefm.eval.targets import check_feature_files
    from slidefm.io.bags import load_bags
    from slidefm.models.mil import slide_encoder_weights

    out = Path(run.out)
    paths = check_feature_files(df, run.features)
    if run.time is None:  # classification runs record their identity (survival runs do not)
        claim_mil_out(out, df, task, cfg, paths, run.overwrite)
    splits = run_splits(df, strata, run.seeds, out / "splits.csv", run.splits, run.folds,
                        cfg.val_fraction)  # fmt: skip
    if cfg.model == "slide_encoder":  # before reading the cohort
        check_slide_encoder_inputs(cfg.slide_encoder, paths[0])
    bags = load_bags(paths, progress=run.progress, cache_gb=cfg.cache_gb)
    enc = None
    if cfg.model == "slide_encoder":
        enc = slide_encoder_weights(cfg.slide_encoder, cfg.slide_encoder_weights)
    return bags, splits, enc


def train_mil(run: MILRun, cfg: MILConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """A classification ``mil train`` run → (result, meta); writes every output to run.out."""
    from slidefm.eval.report import evaluate_predictions, write_csv, write_report
    from slidefm.eval.targets import aggregate_patients, check_class_sizes, make_task
    from slidefm.io.manifest import read_cohort_manifest, strip_labels
    from slidefm.options import SLIDE_LEVEL_RISK

    cfg.validate()
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    df = strip_labels(read_cohort_manifest(run.manifest, run.slide_level_only), list(run.labels))
    task = make_task(df, list(run.labels), list(run.classes) if run.classes else None)
    check_class_sizes(df, task)
    bags, splits, enc_weights = _cohort(run, cfg, df, label_strata(df, task.labels), task)
    preds = run_cv(df, task, bags, splits, cfg, out, progress=run.progress)
    write_csv(preds, out / "predictions.csv")
    level, scored = "slide", preds
    if run.patient_level:
        level, scored = "patient", aggregate_patients(preds, task)
        write_csv(scored, out / "patient_predictions.csv")
    result = evaluate_predictions(scored, task, n_boot=cfg.n_boot, seed=run.seed)
    notes = provenance_notes(bags, cfg, enc_weights)
    if run.slide_level_only:
        notes.append(f"--slide-level-only: {SLIDE_LEVEL_RISK}")
    meta = _run_meta(run, cfg, bags, notes, command="mil train", model=cfg.model,
                     task=task.to_dict(), level=level)  # fmt: skip
    write_report(out, scored, task, result, meta)
    return result, meta


def train_mil_survival(run: MILRun, cfg: MILConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``mil train --task survival`` run → (result, meta); writes predictions.csv,
    patient_predictions.csv, results.json, fold/seed metric CSVs and KM PNGs to run.out."""
    from slidefm.eval.survival import write_survival_report
    from slidefm.io.manifest import check_survival, read_cohort_manifest
    from slidefm.models.survival import SurvivalObjective

    if not run.time or not run.event:
        raise ValueError("--task survival needs --time COL and --event COL")
    cfg.validate()
    SurvivalObjective(cfg.survival_loss, (0.0, np.inf))  # validates the loss name early
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    df = read_cohort_manifest(run.manifest, run.slide_level_only)
    time, event = check_survival(df, run.time, run.event)
    strata = label_strata(df.assign(**{run.event: event}), [run.event])
    bags, splits, enc_weights = _cohort(run, cfg, df, strata, event_task(run.event))
    preds = run_survival_cv(df, time, event, bags, splits, cfg, out, run.progress)
    patients, result = score_survival(preds, out, run.horizons, cfg.n_boot, run.seed)
    meta = _run_meta(
        run, cfg, bags, provenance_notes(bags, cfg, enc_weights),
        command="mil train --task survival", model=cfg.model, survival_loss=cfg.survival_loss,
        time=run.time, event=run.event, level="patient",
        risk="per fold: (risk − median) / sd of the fold model's risks on its training + validation slides; patient = mean over slides",
    )  # fmt: skip
    write_survival_report(out, patients, result, meta, time_label=run.time)
    return result, meta


def report_lines(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """What ``mil train`` prints: a headline, the metric summary with CIs, per-seed log-rank
    p (survival) and the provenance notes."""
    from slidefm.eval.report import format_summary

    folds = f"{result['n_seeds']} seed(s) × {result['n_folds']} fold(s)"
    n = result["n_slides_or_patients"]
    if meta.get("survival_loss"):
        lines = [f"{meta['model']} survival ({meta['survival_loss']}) on {meta['time']}/"
                 f"{meta['event']}: {folds}, {n} patients, {result['n_events']} events"]  # fmt: skip
    else:
        level, labels = meta["level"], "+".join(meta["task"]["labels"])
        lines = [f"{meta['model']} on {labels} ({level} level, {folds}, {n} {level}s):"]
    lines.append(format_summary(result))
    for s in result["per_seed"] if meta.get("survival_loss") else []:
        lines.append(f"  seed {s['seed']}: median-split log-rank p = {s['logrank_p']:.3g}")
    return lines + [f"NOTE: {note}" for note in meta["notes"]]
