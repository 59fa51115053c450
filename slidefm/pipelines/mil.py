"""``slidefm mil train`` / ``slidefm mil predict``: biomarker prediction from tile-feature bags.

train: manifest + feature folder → patient-grouped, label-stratified K-fold CV over several
seeds (splits saved to ``splits.csv`` and reused), one model per (seed, fold) trained by the
project's training loop with early stopping on a validation split carved from the training
folds; out-of-fold predictions, metrics per fold / seed / overall with patient-bootstrap 95%
CIs, ROC PNGs, results CSV + JSON. A finished fold is skipped when the run is repeated.

predict: a fold checkpoint (or a run folder: every fold model, probabilities averaged) →
predictions CSV for a manifest, with metrics when the manifest has the label.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import slidefm
from slidefm.config import config_hash, flag_values, load_config
from slidefm.io.atomic import atomic_path
from slidefm.models import MIL_MODELS
from slidefm.options import SLIDE_LEVEL_RISK, add_overwrite, add_slide_level_only
from slidefm.runtime import no_grad, pick_device, seed_everything

if TYPE_CHECKING:  # torch-based modules load inside the functions (`slidefm --help` stays fast)
    import pandas as pd
    import torch

    from slidefm.eval.targets import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MILConfig:
    model: str = "abmil"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 30
    lr: float = 2e-4
    weight_decay: float = 1e-5
    batch_size: int = 1
    eval_batch_size: int = 8
    max_tiles: int | None = 4096
    balance: str = "weights"
    val_fraction: float = 0.2
    val_metric: str = "loss"
    patience: int = 8
    # A frozen slide encoder's head is a linear probe on fixed embeddings, where an epoch costs
    # milliseconds: it gets its own schedule (more epochs, larger lr and batches).
    head_epochs: int = 100
    head_lr: float = 1e-2
    head_batch_size: int = 16
    head_patience: int = 30
    n_boot: int = 1000
    slide_encoder: str | None = None
    freeze_encoder: bool = True
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    cache_gb: float = 8.0
    standardize: bool = True
    # --task survival (configs/mil/survival.yaml): cox | nll, time bins of nll, its weight on
    # uncensored patients; val_metric may then also be c_index.
    survival_loss: str = "cox"
    survival_bins: int = 4
    survival_alpha: float = 0.0

    def validate(self) -> None:
        if self.model not in MIL_MODELS:
            raise ValueError(
                f"Unknown --model {self.model!r}; choose one of {', '.join(MIL_MODELS)}"
            )
        if self.balance not in ("weights", "sampler", "none"):
            raise ValueError(f"balance must be weights, sampler or none, not {self.balance!r}")
        if self.val_metric not in ("loss", "auroc", "c_index"):
            raise ValueError(f"val_metric must be loss, auroc or c_index, not {self.val_metric!r}")
        if self.model == "slide_encoder" and not self.slide_encoder:
            raise ValueError(
                "--model slide_encoder needs --slide-encoder CHECKPOINT (or a config name for random init)"
            )


# -- data -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Bags:
    """The cohort's bags: features (N_i, D) float32 and grid (N_i, 2) int64 per slide, held in
    memory when they fit in ``cache_gb`` (every fold and seed reuses them), else read from
    disk at each access."""

    paths: list[Path]
    dim: int
    attrs: dict[str, Any]
    cached: list[tuple[np.ndarray, np.ndarray]] | None = None
    embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per encoder

    @property
    def slide_ids(self) -> list[str]:
        return [p.stem for p in self.paths]

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        from slidefm.io.features import read_features

        if self.cached is not None:
            return self.cached[j]
        sf = read_features(self.paths[j])
        return sf.features.astype(np.float32, copy=False), sf.grid.astype(np.int64)


def load_bags(paths: list[Path], progress: bool = True, cache_gb: float = 8.0) -> Bags:
    """Check every feature file (tiles present, one tile encoder for the cohort) and load them
    into memory when their float32 size is under ``cache_gb``."""
    from tqdm import tqdm

    from slidefm.io.features import check_cohort, read_attrs

    shapes = check_cohort(paths)
    first = read_attrs(paths[0])
    attrs = {k: first.get(k) for k in ("encoder", "encoder_weights", "target_mpp", "patch_size")}
    bags = Bags(list(paths), shapes[0][1], attrs)
    if sum(n * d for n, d in shapes) * 4 / 2**30 <= cache_gb:
        bags.cached = [
            bags.get(j)
            for j in tqdm(
                range(len(paths)), desc="reading features", unit="slide", disable=not progress
            )
        ]
    else:
        log.info("features exceed %.1f GB: reading them from disk at each access", cache_gb)
    return bags


class BagDataset:
    """Items of in-memory ``Bags`` with targets, in ``FeatureBagDataset``'s item format.

    ``max_tiles`` draws a random tile subset per (seed, epoch, item) — training augmentation
    and a memory cap; evaluation passes None and sees every tile. A map-style dataset by its
    ``__len__``/``__getitem__`` (no ``torch.utils.data.Dataset`` base: this module imports
    torch only when it runs, so ``slidefm mil --help`` stays fast).
    """

    def __init__(
        self,
        bags: Bags,
        index: np.ndarray,
        y: np.ndarray,
        max_tiles: int | None = None,
        seed: int = 0,
    ):
        self.bags, self.index, self.y, self.max_tiles, self.seed = (
            bags,
            np.asarray(index),
            np.asarray(y),
            max_tiles,
            seed,
        )
        self.epoch = 0

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        from slidefm.io.bags import collate_bags

        return collate_bags(items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from slidefm.io.bags import item_rng, subsample

        j = int(self.index[i])
        f, g = self.bags.get(j)
        keep = subsample(len(f), self.max_tiles, item_rng(self.seed, self.epoch, i))
        if len(keep) < len(f):
            f, g = f[keep], g[keep]
        return {
            "features": torch.from_numpy(f),
            "grid": torch.from_numpy(g),
            "slide_id": self.bags.slide_ids[j],
            "label": self.y[j].tolist(),
        }


def feature_stats(bags: Bags, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (D,) over every tile of the bags in ``index``: the project's
    one tile-statistics routine (``models.pretrain.feature_stats``, float64 sums), uncapped."""
    from slidefm.models.pretrain import feature_stats as tile_feature_stats

    mean, std = tile_feature_stats((bags.get(int(j))[0] for j in index), max_tiles=sys.maxsize)
    return mean.numpy(), std.numpy()


class EmbeddingDataset:
    """Frozen slide-encoder embeddings (N_slides, E) as training items ``{"embedding", "label"}``."""

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return torch.utils.data.default_collate(items)

    def __init__(self, z: np.ndarray, index: np.ndarray, y: np.ndarray):
        self.z, self.index, self.y = z, np.asarray(index), np.asarray(y)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        j = int(self.index[i])
        return {"embedding": torch.from_numpy(self.z[j]), "label": torch.as_tensor(self.y[j])}


# -- training -------------------------------------------------------------------------------
def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import torch

    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def forward_batch(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model on a bag batch, or on precomputed embeddings (frozen slide encoder)."""
    if "embedding" in batch:
        return model(None, embedding=batch["embedding"])
    return model(batch["features"], batch["grid"], batch["padding_mask"])


@no_grad
def predict_bags(
    model: torch.nn.Module,
    dataset: BagDataset | EmbeddingDataset,
    batch_size: int,
    device: torch.device,
    multilabel: bool,
    raw: bool = False,
) -> np.ndarray:
    """(len(dataset), C) probabilities (``raw``: logits); bags are used whole (every tile)."""
    import torch

    from slidefm.models.mil import probabilities

    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate
    )
    out = [
        (lambda z: z.float() if raw else probabilities(z, multilabel))(
            forward_batch(model, _to(b, device))["logits"]
        ).cpu()
        for b in loader
    ]
    return torch.cat(out).numpy().astype(np.float64)


@no_grad
def frozen_embeddings(
    model: torch.nn.Module, bags: Bags, key: str, batch_size: int, device: torch.device
) -> np.ndarray:
    """(N_slides, E) embeddings of every whole bag by a frozen slide encoder, computed once per
    run (cached on ``bags`` under ``key``) and shared by all folds and seeds."""
    import torch

    from slidefm.io.bags import collate_bags

    if key not in bags.embeddings:
        model = model.to(device).eval()
        ds = BagDataset(bags, np.arange(len(bags.paths)), np.zeros(len(bags.paths), np.int64))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, collate_fn=collate_bags
        )
        z = [
            model.encoder(b["features"], b["grid"], b["padding_mask"]).float().cpu()
            for b in map(lambda b: _to(b, device), loader)
        ]
        bags.embeddings[key] = torch.cat(z).numpy()
    return bags.embeddings[key]


def _val_score(
    model, val_set, y_val, cfg: MILConfig, device, task: Task, weight
) -> tuple[float, dict[str, float]]:
    """Validation (score to maximise, metrics): −loss (weighted like training) or AUROC."""
    import torch

    from slidefm.eval.metrics import auroc
    from slidefm.models.mil import mil_loss

    prob = predict_bags(model, val_set, cfg.eval_batch_size, device, task.multilabel)
    p = torch.from_numpy(prob)
    t = torch.as_tensor(y_val)
    if task.multilabel:
        loss = mil_loss(
            torch.logit(p.clamp(1e-7, 1 - 1e-7)), t, True, None if weight is None else weight.cpu()
        ).item()
    else:
        w = None if weight is None else weight.cpu().to(p.dtype)
        loss = torch.nn.functional.nll_loss(
            torch.log(p.clamp_min(1e-12)), t.long(), weight=w
        ).item()
    auc = auroc(y_val, prob, num_classes=task.num_classes)
    metrics = {"val_loss": loss, "val_auroc": auc}
    return (-loss if cfg.val_metric == "loss" else (auc if np.isfinite(auc) else -np.inf)), metrics


class _EarlyStop(Exception):
    """Raised by the validation hook to end a fold: the loop has no stopping hook of its own."""


CKPT_EPOCHS = 5  # Trainer checkpoint (and loss-curve PNG) every this many epochs


def _build_model(
    cfg: MILConfig, in_dim: int, num_classes: int
) -> tuple[torch.nn.Module, dict, str | None]:
    from slidefm.models.mil import build_mil_model, build_slide_encoder

    encoder, enc_weights = None, None
    kwargs = dict(cfg.model_kwargs)
    if cfg.model == "slide_encoder":
        encoder, enc_weights = build_slide_encoder(cfg.slide_encoder, in_dim)
        kwargs["freeze"] = cfg.freeze_encoder
    return (
        build_mil_model(cfg.model, in_dim, num_classes, encoder=encoder, **kwargs),
        kwargs,
        enc_weights,
    )


def train_fold(
    bags: Bags,
    y: np.ndarray,
    idx: dict[str, np.ndarray],
    task: Task,
    cfg: MILConfig,
    out_dir: Path,
    seed: int,
    objective: Any = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on ``idx["train"]`` with the project's ``Trainer`` (AdamW, warmup + cosine);
    after every epoch the validation score (−loss or AUROC on ``idx["val"]``) picks the best
    epoch, and ``patience`` epochs without improvement stop the fold. The Trainer checkpoints
    every ``CKPT_EPOCHS`` epochs and the early-stopping state (``best.pt``,
    ``early_stopping.json``) lives beside it, so an interrupted fold resumes; a fold folder
    left by a different config is cleared first. Returns the best-epoch model and its meta.

    ``objective`` (survival, ``models.survival.SurvivalObjective``) replaces the classification
    loss, head width and validation score; ``y`` then holds its (N, 3) targets.
    """
    import torch

    from slidefm.eval.report import write_json
    from slidefm.models.mil import Standardized, class_weights, mil_loss
    from slidefm.train.data import make_loader
    from slidefm.train.loop import CKPT_RE, TrainConfig, Trainer, latest_checkpoint

    seed_everything(seed)
    n_out = task.num_classes if objective is None else objective.num_outputs
    model, kwargs, enc_weights = _build_model(cfg, bags.dim, n_out)
    standardize = cfg.standardize and cfg.model != "slide_encoder"
    if standardize:
        mean, std = feature_stats(bags, idx["train"])
        model = Standardized(model, torch.from_numpy(mean), torch.from_numpy(std))
    device = pick_device(cfg.device)
    y_tr = y[idx["train"]]
    weight = None
    probe = cfg.model == "slide_encoder" and cfg.freeze_encoder
    epochs, lr, batch_size, patience = (
        (cfg.head_epochs, cfg.head_lr, cfg.head_batch_size, cfg.head_patience)
        if probe
        else (cfg.epochs, cfg.lr, cfg.batch_size, cfg.patience)
    )
    if cfg.model == "slide_encoder":
        # The (initial) encoder's embedding of every whole bag, computed once: its training-fold
        # statistics standardise the head's input, and a frozen encoder's head trains on these
        # embeddings directly (a random-init encoder differs per fold seed, hence the key).
        key = enc_weights if enc_weights != "random" else f"{cfg.slide_encoder}|seed{seed}"
        z = frozen_embeddings(model, bags, key, cfg.eval_batch_size, device)
        model.set_embedding_stats(z[idx["train"]])
    if probe:
        train_set, val_set = (
            EmbeddingDataset(z, idx["train"], y),
            EmbeddingDataset(z, idx["val"], y),
        )
    else:
        train_set, val_set = (
            BagDataset(bags, idx["train"], y, cfg.max_tiles, seed),
            BagDataset(bags, idx["val"], y),
        )
    if cfg.balance == "sampler" and objective is None:
        if task.multilabel:
            raise ValueError("balance=sampler needs a single-label task; use balance=weights")
        w = class_weights(torch.as_tensor(y_tr), task.num_classes)[torch.as_tensor(y_tr)]
        g = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.WeightedRandomSampler(
            w.double(), len(y_tr), replacement=True, generator=g
        )
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size,
            sampler=sampler,
            collate_fn=train_set.collate,
            num_workers=cfg.num_workers,
            generator=g,
        )
    else:
        if cfg.balance == "weights" and objective is None:
            weight = class_weights(torch.as_tensor(y_tr), task.num_classes, task.multilabel).to(
                device
            )
        loader = make_loader(
            train_set,
            batch_size,
            shuffle=True,
            seed=seed,
            num_workers=cfg.num_workers,
            collate_fn=train_set.collate,
        )
    steps_per_epoch = len(loader)
    train_dir = out_dir / "train"
    marker = train_dir / "config_hash.txt"
    chash = f"{config_hash(cfg)}-{seed}"
    if train_dir.exists() and (not marker.is_file() or marker.read_text() != chash):
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(chash)
    state_path, best_path = train_dir / "early_stopping.json", train_dir / "best.pt"
    es: dict[str, Any] = {"best_score": None, "best_epoch": -1, "history": []}
    ckpt = latest_checkpoint(train_dir / "checkpoints")
    if ckpt is not None and state_path.is_file():
        # Resume: the loop replays the epochs after its checkpoint bit-exactly, so their
        # evaluations are dropped and will be recomputed (to the same values).
        es = json.loads(state_path.read_text())
        done_step = int(CKPT_RE.match(ckpt.name).group(1))
        es["history"] = [h for h in es["history"] if h["step"] <= done_step]

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = forward_batch(m, batch)["logits"]
        if objective is not None:
            return objective(logits, batch["label"]), {}
        return mil_loss(logits, batch["label"], task.multilabel, weight), {}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        if objective is not None:
            from slidefm.eval.survival import survival_val_score

            logits = predict_bags(m, val_set, cfg.eval_batch_size, device, False, raw=True)
            score, metrics = survival_val_score(objective, logits, y[idx["val"]], cfg.val_metric)
        else:
            score, metrics = _val_score(m, val_set, y[idx["val"]], cfg, device, task, weight)
        epoch = len(es["history"])
        es["history"].append(
            {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "score": score, **metrics}
        )
        if es["best_score"] is None or score > es["best_score"]:
            es.update(best_score=score, best_epoch=epoch, best_metrics=metrics)
            with atomic_path(best_path) as tmp:
                torch.save(m.state_dict(), tmp)
        write_json(es, state_path)
        if epoch - es["best_epoch"] >= patience:
            raise _EarlyStop
        return metrics

    tcfg = TrainConfig(
        max_steps=epochs * steps_per_epoch,
        lr=lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=steps_per_epoch,
        precision=cfg.precision,
        ckpt_every=CKPT_EPOCHS * steps_per_epoch,
        keep_checkpoints=1,
        log_every=steps_per_epoch,
        eval_every=steps_per_epoch,
        out_dir=str(train_dir),
        seed=seed,
        device=str(device),
        progress=False,
    )
    trainer = Trainer(model, loss_fn, loader, tcfg, eval_fn=eval_fn)
    try:
        trainer.fit()
    except _EarlyStop:
        trainer.write_metrics()
    model = trainer.module
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    model.eval()
    meta = {
        "model": cfg.model,
        "in_dim": bags.dim,
        "num_classes": n_out,
        "model_kwargs": kwargs,
        "standardize": standardize,
        "task": task.to_dict(),
        "survival": None if objective is None else objective.to_dict(),
        "best_epoch": es["best_epoch"],
        "epochs_run": len(es["history"]),
        "val": es.get("best_metrics", {}),
        "slide_encoder": {
            "spec": cfg.slide_encoder,
            "weights": enc_weights,
            "config": dataclasses.asdict(model.encoder.config),
        }
        if cfg.model == "slide_encoder"
        else None,
    }
    return model, meta


# -- cross-validation -----------------------------------------------------------------------
def _stratum(df: pd.DataFrame, task: Task) -> pd.Series:
    return df[list(task.labels)].astype(str).agg("|".join, axis=1)


def build_splits(
    df: pd.DataFrame,
    task: Task,
    args: argparse.Namespace,
    cfg: MILConfig,
    seeds: list[int],
    out: Path,
) -> pd.DataFrame:
    """Saved splits (``--splits FILE``), the manifest's split column, or K-fold CV."""
    from slidefm.eval.splits import (
        load_or_make_splits,
        load_splits,
        save_splits,
        splits_from_manifest,
    )

    sdf = df.assign(_stratum=_stratum(df, task))
    ids = df["slide_id"].astype(str).tolist()
    if args.splits:
        splits = load_splits(args.splits, ids)
        splits = splits[splits["seed"].isin(seeds)]
        if splits.empty:
            raise ValueError(f"{args.splits} has none of seeds {seeds}")
        save_splits(splits, out / "splits.csv")
        return splits.reset_index(drop=True)
    if args.folds == 0:
        splits = splits_from_manifest(sdf, "_stratum", seeds)
        save_splits(splits, out / "splits.csv")
        return splits
    splits = load_or_make_splits(
        out / "splits.csv", sdf, "_stratum", args.folds, seeds, cfg.val_fraction
    )
    want = dict(zip(sdf["slide_id"].astype(str), sdf["_stratum"]))
    if (splits["slide_id"].map(want) != splits["stratum"].astype(str)).any():
        raise ValueError(
            f"{out / 'splits.csv'} was made for another label; use a new --out, or pass it explicitly with --splits to reuse its partitions"
        )
    return splits


def finished_fold(fold_dir: Path, chash: str) -> pd.DataFrame | None:
    """The predictions of a fold finished by the same run (same ``config_hash``), else None."""
    import pandas as pd

    done, meta_path = fold_dir / "predictions.csv", fold_dir / "meta.json"
    if (
        done.is_file()
        and meta_path.is_file()
        and json.loads(meta_path.read_text()).get("config_hash") == chash
    ):
        return pd.read_csv(done, dtype={"slide_id": str, "case_id": str})
    return None


def fold_split(
    part: pd.DataFrame, pos: dict[str, int], seed: int, fold: int
) -> dict[str, np.ndarray]:
    """Row indices of one fold's train/val/test; an empty one is an error naming the fold."""
    from slidefm.eval.splits import fold_indices

    idx = fold_indices(part, pos)
    for name in ("train", "val", "test"):
        if len(idx[name]) == 0:
            raise ValueError(
                f"seed {seed} fold {fold}: empty {name} split; use fewer folds or more patients"
            )
    return idx


def run_cv(
    df: pd.DataFrame,
    task: Task,
    bags: Bags,
    splits: pd.DataFrame,
    cfg: MILConfig,
    out: Path,
    progress: bool = True,
) -> pd.DataFrame:
    """Train and test every (seed, fold); returns the out-of-fold prediction table."""
    import pandas as pd
    from tqdm import tqdm

    from slidefm.eval.report import write_csv, write_json
    from slidefm.eval.targets import encode_targets, prediction_frame
    from slidefm.models.mil import save_mil_checkpoint

    y = encode_targets(df, task)
    pos = {s: i for i, s in enumerate(df["slide_id"].astype(str))}
    bag_pos = {s: i for i, s in enumerate(bags.slide_ids)}
    if [bag_pos[s] for s in df["slide_id"].astype(str)] != list(range(len(df))):
        raise RuntimeError("bags are not in manifest order")
    # A finished fold is reused only for the same config, task and feature encoder.
    chash = config_hash(
        {"config": dataclasses.asdict(cfg), "task": task.to_dict(), "features": bags.attrs}
    )
    all_preds = []
    groups = list(splits.groupby(["seed", "fold"], sort=True))
    bar = tqdm(groups, desc=f"mil {cfg.model}", unit="fold", disable=not progress)
    for (seed, fold), part in bar:
        bar.set_postfix(seed=seed, fold=fold)
        fold_dir = out / f"seed{seed}" / f"fold{fold}"
        finished = finished_fold(fold_dir, chash)
        if finished is not None:
            log.info("seed %s fold %s: done, skipping", seed, fold)
            all_preds.append(finished)
            continue
        idx = fold_split(part, pos, seed, fold)
        log.debug(
            "seed %s fold %s: %d train / %d val / %d test slides",
            seed,
            fold,
            *(len(idx[k]) for k in ("train", "val", "test")),
        )
        model, meta = train_fold(bags, y, idx, task, cfg, fold_dir, int(seed) * 1000 + int(fold))
        device = next(model.parameters()).device
        prob = predict_bags(
            model, BagDataset(bags, idx["test"], y), cfg.eval_batch_size, device, task.multilabel
        )
        preds = prediction_frame(df.iloc[idx["test"]], y[idx["test"]], task, seed, fold, prob)
        seen = np.concatenate([idx["train"], idx["val"]])  # fitted on, or early-stopped on
        meta.update(
            seed=int(seed),
            fold=int(fold),
            config=dataclasses.asdict(cfg),
            config_hash=chash,
            features=bags.attrs,
            train_slide_ids=df["slide_id"].astype(str).iloc[seen].tolist(),
            train_case_ids=sorted(set(df["case_id"].astype(str).iloc[seen])),
        )
        save_mil_checkpoint(fold_dir / "model.pt", model, meta)
        write_json(meta, fold_dir / "meta.json")
        write_csv(preds, fold_dir / "predictions.csv")  # last: it marks the fold finished
        all_preds.append(preds)
    return pd.concat(all_preds, ignore_index=True)


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


def run_train(args: argparse.Namespace) -> int:
    if getattr(args, "task", "classification") == "survival":
        from slidefm.pipelines.mil_survival import run_train_survival

        return run_train_survival(args)
    if not args.label:
        raise ValueError("mil train needs --label COL (or --task survival --time COL --event COL)")
    from slidefm.eval.report import evaluate_predictions, format_summary, write_csv, write_report
    from slidefm.eval.targets import (
        aggregate_patients,
        check_class_sizes,
        check_feature_files,
        make_task,
    )
    from slidefm.io.manifest import read_cohort_manifest, strip_labels
    from slidefm.models.mil import slide_encoder_weights

    cfg = config_from_args(args)
    cfg.validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds)
    df = read_cohort_manifest(args.manifest, args.slide_level_only)
    df = strip_labels(df, parse_labels(args.label))
    task = make_task(df, parse_labels(args.label), parse_list(args.classes))
    check_class_sizes(df, task)
    paths = check_feature_files(df, args.features)
    claim_mil_out(out, df, task, cfg, paths, args.overwrite)
    splits = build_splits(df, task, args, cfg, seeds, out)
    bags = load_bags(paths, progress=not args.no_progress, cache_gb=cfg.cache_gb)
    enc_weights = slide_encoder_weights(cfg.slide_encoder) if cfg.model == "slide_encoder" else None
    preds = run_cv(df, task, bags, splits, cfg, out, progress=not args.no_progress)
    write_csv(preds, out / "predictions.csv")
    level = "slide"
    scored = preds
    if args.patient_level:
        scored = aggregate_patients(preds, task)
        write_csv(scored, out / "patient_predictions.csv")
        level = "patient"
    result = evaluate_predictions(scored, task, n_boot=cfg.n_boot, seed=args.seed)
    notes = provenance_notes(bags, cfg, enc_weights)
    if args.slide_level_only:
        notes.append(f"--slide-level-only: {SLIDE_LEVEL_RISK}")
    meta = {
        "command": "mil train",
        "model": cfg.model,
        "task": task.to_dict(),
        "level": level,
        "seeds": seeds,
        "seed": args.seed,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "features": bags.attrs,
        "notes": notes,
        "slidefm_version": slidefm.__version__,
    }
    write_report(out, scored, task, result, meta)
    print(
        f"{cfg.model} on {'+'.join(task.labels)} ({level} level, {result['n_seeds']} seed(s) × {result['n_folds']} fold(s), {result['n_slides_or_patients']} {level}s):"
    )
    print(format_summary(result))
    for n in notes:
        print(f"NOTE: {n}")
    print(f"results: {out / 'results.json'}")
    return 0


# -- predict --------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from slidefm.eval.report import evaluate_predictions, format_summary, write_csv, write_json
    from slidefm.eval.targets import (
        Task,
        aggregate_patients,
        check_feature_files,
        encode_targets,
        target_frame,
    )
    from slidefm.io.features import check_encoder_matches
    from slidefm.io.manifest import read_manifest, strip_labels
    from slidefm.models.mil import load_mil_checkpoint

    ckpt = Path(args.checkpoint)
    files = sorted(ckpt.glob("seed*/fold*/model.pt")) if ckpt.is_dir() else [ckpt]
    if not files:
        raise FileNotFoundError(
            f"No model.pt under {ckpt}; pass a fold checkpoint or a `mil train` output folder"
        )
    models = [load_mil_checkpoint(f) for f in files]
    if models[0][1].get("survival"):
        raise ValueError(
            f"{ckpt} holds survival models: `mil predict` scores classifiers only; out-of-fold risks are in its patient_predictions.csv"
        )
    task = Task.from_dict(models[0][1]["task"])
    if any(Task.from_dict(m["task"]) != task for _, m in models):
        raise ValueError(f"Checkpoints under {ckpt} predict different tasks; pass one checkpoint")
    df = strip_labels(read_manifest(args.manifest, required=("slide_id",)), task.labels)
    paths = check_feature_files(df, args.features)
    bags = load_bags(paths, progress=not args.no_progress)
    if bags.dim != models[0][1]["in_dim"]:
        raise ValueError(
            f"Features are {bags.dim}-d but the model expects {models[0][1]['in_dim']}-d; use features from the encoder it was trained on ({models[0][1].get('features', {}).get('encoder')})"
        )
    check_encoder_matches(paths[0], bags.attrs, models[0][1].get("features", {}), files[0])
    has_label = all(c in df for c in task.labels)
    y = encode_targets(df, task) if has_label else np.zeros(len(df), dtype=np.int64)
    seen = seen_in_training(df, [m for _, m in models])
    device = pick_device(args.device)
    ds = BagDataset(bags, np.arange(len(df)), y)
    prob = np.mean(
        [predict_bags(m.to(device), ds, 8, device, task.multilabel) for m, _ in models], axis=0
    )
    parts = [
        pd.DataFrame({"slide_id": df["slide_id"].astype(str), "case_id": df["case_id"].astype(str)})
    ]
    if has_label:
        parts.append(target_frame(y, task))
    parts.append(pd.DataFrame(prob, columns=task.prob_columns))
    preds = pd.concat(parts, axis=1)
    preds["seen_in_training"] = seen
    if not task.multilabel:
        preds["pred"] = [task.classes[i] for i in prob.argmax(1)]
    if args.patient_level:
        preds = aggregate_patients(
            preds.assign(seed=0, fold=0).drop(columns=["pred", "seen_in_training"]), task
        ).drop(columns=["seed", "fold"])
        preds["seen_in_training"] = preds["case_id"].isin(set(df["case_id"].astype(str)[seen]))
    out = Path(args.out)
    write_csv(preds, out)
    print(f"{len(preds)} prediction(s) from {len(models)} model(s) → {out}")
    scored = preds
    if preds["seen_in_training"].any():
        n_seen, n = int(preds["seen_in_training"].sum()), len(preds)
        if args.include_seen:
            print(f"WARNING: {n_seen} of {n} rows were in these models' training/validation data "
                  "and are scored (--include-seen): the metrics overestimate performance")  # fmt: skip
        else:
            scored = preds[~preds["seen_in_training"]]
            print(f"WARNING: {n_seen} of {n} rows were in these models' training/validation data "
                  f"(seen_in_training in the CSV): metrics cover the {len(scored)} held-out rows "
                  "only (--include-seen scores all)")  # fmt: skip
    y_s = scored[task.target_columns].to_numpy() if has_label else np.zeros((0, 1))
    if has_label and len(np.unique(y_s[:, 0])) > 1:
        res = evaluate_predictions(
            scored.drop(columns=["seen_in_training"]).assign(seed=0, fold=0),
            task,
            n_boot=1000,
            seed=args.seed,
        )
        write_json(
            {
                "command": "mil predict",
                "checkpoints": [str(f) for f in files],
                "seed": args.seed,
                "scored_rows": len(scored),
                "seen_rows_scored": int(scored["seen_in_training"].sum()),
                **res,
            },
            out.with_suffix(".metrics.json"),
        )
        print(format_summary(res))
    elif has_label:
        print("no metrics: the held-out rows do not have both classes")
    return 0


def seen_in_training(df: pd.DataFrame, metas: list[dict[str, Any]]) -> np.ndarray:
    """[N] bool: rows whose slide or patient any of the models trained (or early-stopped) on;
    checkpoints written before this was recorded know none."""
    import pandas as pd

    slides = {s for m in metas for s in m.get("train_slide_ids", [])}
    cases = {c for m in metas for c in m.get("train_case_ids", [])}
    ids = df["slide_id"].astype(str)
    case = df["case_id"].astype(str) if "case_id" in df else pd.Series([None] * len(df))
    return (ids.isin(slides) | case.isin(cases)).to_numpy()


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


# -- CLI ------------------------------------------------------------------------------------
FLAG_TO_FIELD = {
    "model": str,
    "epochs": int,
    "lr": float,
    "batch_size": int,
    "max_tiles": int,
    "balance": str,
    "slide_encoder": str,
    "device": str,
}


def parse_list(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def parse_labels(s: str) -> list[str]:
    return parse_list(s) or []


def parse_seeds(s: str) -> list[int]:
    try:
        return [int(x) for x in parse_list(s) or ["0"]]
    except ValueError as e:
        raise ValueError(f"--seeds must be comma-separated integers, got {s!r}") from e


def config_from_args(args: argparse.Namespace) -> MILConfig:
    """YAML < explicit flags < ``--set``, as every command (``slidefm.config``)."""
    default = "survival" if getattr(args, "task", None) == "survival" else "default"
    flags = flag_values(args, list(FLAG_TO_FIELD))
    if getattr(args, "finetune", False):
        flags["freeze_encoder"] = False
    return load_config(MILConfig, args.config or default, args.overrides, "mil", flags)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

    p = sub.add_parser(
        "mil", help="MIL biomarker prediction: cross-validated training and prediction"
    )
    msub = p.add_subparsers(dest="mil_command", metavar="{train,predict}")
    msub.required = True

    t = msub.add_parser(
        "train", help="K-fold CV (patient-grouped) over seeds → metrics with 95%% CIs"
    )
    t.add_argument(
        "--manifest", required=True, help="CSV with slide_id, case_id and the label column(s)"
    )
    t.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    t.add_argument("--label", help="label column, or COL1,COL2,… (0/1 each) for multi-label")
    t.add_argument(
        "--task",
        choices=("classification", "survival"),
        default="classification",
        help="survival: right-censored follow-up from --time/--event (configs/mil/survival.yaml)",
    )
    t.add_argument("--time", help="survival: follow-up time column (days, months, …; ≥ 0)")
    t.add_argument("--event", help="survival: event column (1 = event, 0 = censored)")
    t.add_argument(
        "--horizons",
        help="survival: comma-separated times for time-dependent AUC (default: event-time quartiles)",
    )
    t.add_argument("--classes", help="comma-separated class order; other label values are an error")
    t.add_argument("--model", choices=MIL_MODELS, default=None)
    t.add_argument(
        "--folds",
        type=int,
        default=5,
        help="K for cross-validation; 0 = use the manifest's split column",
    )
    t.add_argument(
        "--seeds", default="0", help="comma-separated seeds (splits and initialisation), e.g. 0,1,2"
    )
    t.add_argument(
        "--splits", help="reuse a saved splits.csv (from another run) instead of making one"
    )
    t.add_argument(
        "--patient-level",
        action="store_true",
        help="aggregate slide predictions per case_id before scoring",
    )
    t.add_argument("--out", required=True, help="output folder")
    add_slide_level_only(t)
    for name, typ in FLAG_TO_FIELD.items():
        if name != "model":
            t.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                type=typ,
                default=None,
                help=f"config {name}",
            )
    t.add_argument(
        "--finetune", action="store_true", help="slide_encoder: fine-tune the encoder too"
    )
    t.add_argument("--no-progress", action="store_true")
    add_overwrite(t)
    add_common(t, "mil")
    t.set_defaults(func=run_train)

    q = msub.add_parser(
        "predict", help="predict slides with a trained model (or all fold models of a run)"
    )
    q.add_argument(
        "--checkpoint", required=True, help="model.pt of one fold, or a `mil train` output folder"
    )
    q.add_argument("--manifest", required=True)
    q.add_argument("--features", required=True)
    q.add_argument("--out", required=True, help="predictions CSV")
    q.add_argument("--patient-level", action="store_true")
    q.add_argument(
        "--include-seen",
        action="store_true",
        help="score rows the models trained on too (left out of the metrics by default)",
    )
    q.add_argument("--device", default="auto")
    q.add_argument("--no-progress", action="store_true")
    add_common(q)
    q.set_defaults(func=run_predict)
