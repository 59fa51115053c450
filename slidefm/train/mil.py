"""One MIL model per cross-validation fold: ``MILConfig`` and ``train_fold``.

The project's ``Trainer`` (AdamW, warmup + cosine) trains on the fold's training slides; a
``ModelSelection`` callback scores every epoch on the validation slides (−loss, AUROC or
C-index), keeps the best epoch's weights and stops after ``patience`` epochs without
improvement. Its state travels in the Trainer checkpoint (every ``CKPT_EPOCHS`` epochs), so an
interrupted fold resumes to the same model.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidefm.config import config_hash
from slidefm.models import MIL_MODELS
from slidefm.models.mil_config import HeadConfig, as_kwargs, head_config
from slidefm.runtime import pick_device, seed_everything

if TYPE_CHECKING:
    import torch

    from slidefm.eval.targets import Task
    from slidefm.io.bags import Bags

CKPT_EPOCHS = 5  # Trainer checkpoint (and loss-curve PNG) every this many epochs


@dataclasses.dataclass(frozen=True)
class MILConfig:
    model: str = "abmil"
    # The head's typed options (``models.mil_config``); a mapping (YAML, --set, Python) is
    # turned into the dataclass of ``model`` on construction.
    model_kwargs: HeadConfig | dict = dataclasses.field(default_factory=dict)
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
    slide_encoder: str | None = None  # a `slidefm pretrain` checkpoint or a registry name
    slide_encoder_weights: str | None = None  # with a registry name: random | hub | PATH
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

    def __post_init__(self) -> None:
        if self.model in MIL_MODELS:  # an unknown model is validate()'s message
            object.__setattr__(self, "model_kwargs", head_config(self.model, self.model_kwargs))

    @property
    def probe(self) -> bool:
        """A frozen slide encoder: its head trains on cached embeddings, on the head schedule."""
        return self.model == "slide_encoder" and self.freeze_encoder

    def schedule(self) -> tuple[int, float, int, int]:
        """(epochs, lr, batch size, patience): the head schedule for a frozen encoder."""
        if self.probe:
            return self.head_epochs, self.head_lr, self.head_batch_size, self.head_patience
        return self.epochs, self.lr, self.batch_size, self.patience

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
                "--model slide_encoder needs --slide-encoder CHECKPOINT, or a registry name "
                "(`slidefm slide-encoders list`) with --slide-encoder-weights random|hub|PATH"
            )


def feature_stats(bags: Bags, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (D,) over every tile of the bags in ``index``: the project's
    one tile-statistics routine (``models.pretrain.feature_stats``, float64 sums), uncapped."""
    from slidefm.models.pretrain import feature_stats as tile_feature_stats

    mean, std = tile_feature_stats((bags.get(int(j))[0] for j in index), max_tiles=sys.maxsize)
    return mean.numpy(), std.numpy()


def build_model(
    cfg: MILConfig, in_dim: int, num_classes: int
) -> tuple[torch.nn.Module, dict, str | None]:
    """(model, its constructor kwargs as recorded in the checkpoint, slide-encoder weights)."""
    from slidefm.models.mil import build_mil_model, build_slide_encoder

    encoder, enc_weights = None, None
    kwargs = as_kwargs(cfg.model_kwargs)
    if cfg.model == "slide_encoder":
        encoder, enc_weights = build_slide_encoder(
            cfg.slide_encoder, in_dim, cfg.slide_encoder_weights
        )
        kwargs["freeze"] = cfg.freeze_encoder
    model = build_mil_model(cfg.model, in_dim, num_classes, encoder=encoder, **kwargs)
    return model, kwargs, enc_weights


def _val_score(model, val_set, y_val, cfg: MILConfig, device, task: Task, weight) -> dict:
    """Validation metrics of a classifier, scored by ``val_score``: loss (weighted like
    training) and AUROC."""
    import torch

    from slidefm.eval.inference import predict_bags
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
    return {"val_loss": loss, "val_auroc": auroc(y_val, prob, num_classes=task.num_classes)}


def val_score(metrics: dict[str, float], val_metric: str) -> float:
    """The number early stopping maximises: −val_loss, or the ranking metric (val_auroc /
    val_c_index, whichever the task reports; undefined → −inf)."""
    if val_metric == "loss":
        return -metrics["val_loss"]
    rank = metrics.get("val_auroc", metrics.get("val_c_index", np.nan))
    return rank if np.isfinite(rank) else -np.inf


def _train_loader(train_set, y_tr, task: Task, cfg: MILConfig, objective, batch_size, seed):
    """(loader, class weight or None): balance=sampler draws classes evenly, balance=weights
    weights the loss; survival objectives use neither."""
    import torch

    from slidefm.models.mil import class_weights
    from slidefm.train.data import make_loader

    if cfg.balance == "sampler" and objective is None:
        if task.multilabel:
            raise ValueError("balance=sampler needs a single-label task; use balance=weights")
        w = class_weights(torch.as_tensor(y_tr), task.num_classes)[torch.as_tensor(y_tr)]
        g = torch.Generator().manual_seed(seed)
        sampler = torch.utils.data.WeightedRandomSampler(
            w.double(), len(y_tr), replacement=True, generator=g
        )
        loader = torch.utils.data.DataLoader(train_set, batch_size, sampler=sampler,
                                             collate_fn=train_set.collate,
                                             num_workers=cfg.num_workers, generator=g)  # fmt: skip
        return loader, None
    weight = None
    if cfg.balance == "weights" and objective is None:
        weight = class_weights(torch.as_tensor(y_tr), task.num_classes, task.multilabel)
    loader = make_loader(train_set, batch_size, shuffle=True, seed=seed,
                         num_workers=cfg.num_workers, collate_fn=train_set.collate)  # fmt: skip
    return loader, weight


def _fold_fns(cfg: MILConfig, task: Task, objective, weight, val_set, y_val, device):
    """(loss_fn, eval_fn) of a fold's Trainer: the classification loss (class-weighted) or
    the survival objective; validation metrics of either."""
    from slidefm.eval.inference import forward_batch, predict_bags
    from slidefm.models.mil import mil_loss

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = forward_batch(m, batch)["logits"]
        if objective is not None:
            return objective(logits, batch["label"]), {}
        return mil_loss(logits, batch["label"], task.multilabel, weight), {}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        if objective is None:
            return _val_score(m, val_set, y_val, cfg, device, task, weight)
        from slidefm.eval.survival import survival_val_score

        logits = predict_bags(m, val_set, cfg.eval_batch_size, device, False, raw=True)
        return survival_val_score(objective, logits, y_val, cfg.val_metric)[1]

    return loss_fn, eval_fn


def _fold_dir(out_dir: Path, cfg: MILConfig, seed: int) -> Path:
    """``out_dir/train`` for this (config, seed); one left by another config is cleared."""
    train_dir = out_dir / "train"
    marker = train_dir / "config_hash.txt"
    # "-sel": Trainer checkpoints that carry the ModelSelection state (older ones restart).
    chash = f"{config_hash(cfg)}-{seed}-sel"
    if train_dir.exists() and (not marker.is_file() or marker.read_text() != chash):
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(chash)
    return train_dir


def _datasets(model, bags, y, idx, cfg: MILConfig, device, seed: int, enc_weights):
    """(train, val) datasets: whole-bag embeddings of a frozen slide encoder, else bags."""
    from slidefm.eval.inference import EmbeddingDataset, frozen_embeddings
    from slidefm.io.bags import bag_rows

    if cfg.model == "slide_encoder":
        # The (initial) encoder's embedding of every whole bag, computed once: its training-fold
        # statistics standardise the head's input, and a frozen encoder's head trains on these
        # embeddings directly (a random-init encoder differs per fold seed, hence the key).
        key = enc_weights if enc_weights != "random" else f"{cfg.slide_encoder}|seed{seed}"
        z = frozen_embeddings(model, bags, key, cfg.eval_batch_size, device)
        model.set_embedding_stats(z[idx["train"]])
        if cfg.probe:
            return EmbeddingDataset(z, idx["train"], y), EmbeddingDataset(z, idx["val"], y)
    return bag_rows(bags, idx["train"], y, cfg.max_tiles, seed), bag_rows(bags, idx["val"], y)


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
    """Train on ``idx["train"]``, select and early-stop on ``idx["val"]`` (see the module
    docstring); the Trainer's files and the selection history (``early_stopping.json``) live in
    ``out_dir/train``. Returns the best-epoch model and its meta.

    ``objective`` (survival, ``models.survival.SurvivalObjective``) replaces the classification
    loss, head width and validation score; ``y`` then holds its (N, 3) targets.
    """
    import torch

    from slidefm.models.mil import Standardized
    from slidefm.train.loop import ModelSelection, Trainer

    seed_everything(seed)
    n_out = task.num_classes if objective is None else objective.num_outputs
    model, kwargs, enc_weights = build_model(cfg, bags.dim, n_out)
    standardize = cfg.standardize and cfg.model != "slide_encoder"
    if standardize:
        mean, std = feature_stats(bags, idx["train"])
        model = Standardized(model, torch.from_numpy(mean), torch.from_numpy(std))
    device = pick_device(cfg.device)
    epochs, lr, batch_size, patience = cfg.schedule()
    train_set, val_set = _datasets(model, bags, y, idx, cfg, device, seed, enc_weights)
    loader, weight = _train_loader(train_set, y[idx["train"]], task, cfg, objective, batch_size,
                                   seed)  # fmt: skip
    weight = None if weight is None else weight.to(device)
    train_dir = _fold_dir(out_dir, cfg, seed)

    loss_fn, eval_fn = _fold_fns(cfg, task, objective, weight, val_set, y[idx["val"]], device)
    # Best epoch by val_score (the first epoch counts even when undefined), patience epochs.
    select = ModelSelection(lambda metrics: val_score(metrics, cfg.val_metric),
                            train_dir / "best.pt", patience=patience, first_always=True,
                            history_path=train_dir / "early_stopping.json")  # fmt: skip
    tcfg = _train_config(cfg, epochs, lr, len(loader), train_dir, seed, device)
    trainer = Trainer(model, loss_fn, loader, tcfg, eval_fn=eval_fn, callbacks=[select])
    trainer.fit()
    model = trainer.module.eval()
    best = select.best or {}
    fold = {"in_dim": bags.dim, "num_classes": n_out, "model_kwargs": kwargs,
            "standardize": standardize, "task": task.to_dict(),
            "survival": None if objective is None else objective.to_dict(),
            "best_epoch": best.get("index", -1), "epochs_run": len(select.history),
            "val": best.get("metrics", {})}  # fmt: skip
    return model, _fold_meta(cfg, model, fold, enc_weights)


def _train_config(cfg: MILConfig, epochs: int, lr: float, steps_per_epoch: int,
                  train_dir: Path, seed: int, device) -> Any:  # fmt: skip
    """The Trainer schedule of a fold: one evaluation and log row per epoch, warmup one epoch,
    a checkpoint every ``CKPT_EPOCHS`` epochs."""
    from slidefm.train.loop import TrainConfig

    return TrainConfig(
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


def _fold_meta(cfg: MILConfig, model, fold: dict[str, Any], enc_weights: str | None) -> dict:
    """The self-description a fold checkpoint carries (``models.mil.load_mil_checkpoint``)."""
    return {
        "model": cfg.model,
        **fold,
        "slide_encoder": {
            "spec": cfg.slide_encoder,
            "weights": enc_weights,
            "config": model.encoder.config_record()
            if hasattr(model.encoder, "config_record")
            else dataclasses.asdict(model.encoder.config),
        }
        if cfg.model == "slide_encoder"
        else None,
    }
