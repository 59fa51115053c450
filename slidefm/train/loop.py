"""One training loop for every slidefm model (pretraining, alignment, MIL).

``Trainer(model, loss_fn, data, cfg)`` runs AdamW with linear warmup + cosine decay, gradient
clipping, AMP on CUDA (GradScaler for fp16), gradient accumulation and DDP under torchrun.
Checkpoints hold everything a run depends on (model, optimizer, scheduler, scaler, RNG states of
every rank, data position), so stopping and resuming gives bit-identical parameters to an
uninterrupted run when the data comes from ``slidefm.train.data.make_loader``.

``loss_fn(model, batch) -> (loss, {name: float})`` must call ``model(...)`` (the forward), not
another method, so DDP can synchronise gradients.

Model selection and early stopping are ``Callback`` objects (``ModelSelection``): they see
every evaluation, keep the best weights, may ask the loop to stop, and their state travels in
the checkpoint, so a resumed run selects and stops exactly like an uninterrupted one.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import itertools
import logging
import math
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from slidefm.io.atomic import atomic_path, clean_stale_tmp
from slidefm.io.checkpoints import read_checkpoint, save_checkpoint
from slidefm.io.provenance import add_figure_note
from slidefm.io.torch_file import CheckpointError, load_torch_file
from slidefm.runtime import autocast, dist_info, pick_device, seed_everything
from slidefm.train.data import ResumableSampler

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
Hook = Callable[["Trainer"], dict[str, float]]
CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
BEST_CKPT = "best.pt"  # in checkpoints/: weights of the selected step (never matches CKPT_RE)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of one run. Steps count optimizer steps, not batches."""

    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # final lr / peak lr of the cosine decay
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    accum_steps: int = 1  # micro-batches per optimizer step
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (AMP on CUDA only)
    ckpt_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval (eval_fn still runs at the final step)
    out_dir: str = "outputs/train"
    seed: int = 0
    device: str = "auto"
    resume: str = "auto"  # auto (latest checkpoint in out_dir) | none | path to a checkpoint
    progress: bool = True
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient
    # Model selection: the eval metric (an ``eval_fn`` key, e.g. "val_loss") whose best value
    # picks the weights the run ends with; "" keeps the last step's weights.
    select_metric: str = ""
    select_mode: str = "min"  # min | max: which direction of select_metric is better


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for 0-based optimizer step ``step``.

    Linear warmup (step+1)/warmup for step < warmup, then cosine from 1 down to min_lr_ratio at
    ``max_steps``: min + (1 - min) · ½(1 + cos(π · (step - warmup) / (max_steps - warmup))).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 (or fp16 without bf16 support) on CUDA, fp32 elsewhere."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only; biases, norms and 1-d tokens/embeddings get no decay."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) RNG states, as types ``torch.load`` reads safely."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def init_distributed() -> torch.device:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); the device of this rank."""
    rank, world = dist_info()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    return device


def _leave_process_group() -> None:
    """Destroy the group we joined while the interpreter is still whole: a gloo rank that
    exits with its worker threads alive aborts at finalisation ("terminate called without an
    active exception", SIGABRT), which torchrun reports as a failed run after all went well."""
    if dist.is_initialized():
        dist.destroy_process_group()


def checkpoints_newest_first(ckpt_dir: str | Path) -> list[Path]:
    """The ``step_*.pt`` files of ``ckpt_dir``, highest step first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The ``step_*.pt`` with the highest step in ``ckpt_dir``, or None."""
    found = checkpoints_newest_first(ckpt_dir)
    return found[0] if found else None


class Callback:
    """Hooks of ``Trainer.fit``. ``on_evaluate`` runs on rank 0 after each evaluation (it may
    set ``trainer.should_stop``); ``on_fit_end`` on every rank when the run finished or
    stopped. ``state_dict``/``load_state_dict`` travel in the training checkpoint."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ModelSelection(Callback):
    """Best-model selection, and with ``patience`` early stopping, as one rule.

    ``score(metrics)`` maps an evaluation to a number to maximise (None: not scored). An
    evaluation is the new best when its score is finite and strictly greater than the best so
    far (``first_always``: the first scored evaluation is the best even if not finite); its
    weights go to ``path`` as ``{"model", **best}``. With ``patience``, the run stops once
    ``patience`` scored evaluations have passed since the best one. At the end the best weights
    are loaded into the model (``trainer.selection`` says which). ``history_path`` (optional)
    gets {best_score, best_epoch, best_metrics, history} after every evaluation, for people.
    """

    def __init__(
        self,
        score: Callable[[dict[str, float]], float | None],
        path: str | Path,
        patience: int | None = None,
        history_path: str | Path | None = None,
        first_always: bool = False,
        describe: dict[str, Any] | None = None,
    ):
        self.score, self.path, self.patience = score, Path(path), patience
        self.history_path = None if history_path is None else Path(history_path)
        self.first_always = first_always
        self.describe = dict(describe or {})  # e.g. {"metric", "mode"}: copied into best
        self.best: dict[str, Any] | None = None  # {score, step, index, metrics}
        self.history: list[dict[str, Any]] = []  # {index, step, score, **metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.history = state.get("best"), list(state.get("history", []))

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return self.first_always or math.isfinite(value)
        return math.isfinite(value) and value > self.best["score"]

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = self.score(metrics)
        if value is None:
            return
        index = len(self.history)
        self.history.append({"index": index, "step": trainer.step, "score": value, **metrics})
        if self._is_better(float(value)):
            self.best = {"score": float(value), "step": trainer.step, "index": index,
                         "metrics": {k: float(v) for k, v in metrics.items()}}  # fmt: skip
            prov = {"step": trainer.step, "score": float(value)}
            save_checkpoint(self.path, trainer.module, "train_best", provenance=prov)
        if self.history_path is not None:
            self._write_history()
        best_index = -1 if self.best is None else self.best["index"]
        if self.patience is not None and index - best_index >= self.patience:
            trainer.should_stop = True

    def _write_history(self) -> None:
        import json

        best = self.best or {}
        doc = {"best_score": best.get("score"), "best_epoch": best.get("index", -1),
               "best_metrics": best.get("metrics", {}),
               "history": [{"epoch": h["index"], **{k: v for k, v in h.items() if k != "index"}}
                           for h in self.history]}  # fmt: skip
        with atomic_path(self.history_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.selection = self.restore(trainer)

    def restore(self, trainer: Trainer) -> dict[str, Any]:
        """Load the selected weights into the model; returns what was selected.

        {**describe, "value", "step", "last_step", "restored"} (``value``: see ``value``): ``restored`` is False (and the
        last weights are kept, with a warning) when no evaluation was ever scored.
        """
        sel: dict[str, Any] = {**self.describe, "last_step": trainer.step}
        if trainer.world > 1:
            dist.barrier()  # rank 0 wrote the weights
        if self.best is None or not self.path.is_file():
            log.warning(
                "%s was never evaluated (no validation data?): keeping the weights of the "
                "last step %d",
                f"select_metric {self.describe['metric']!r}" if "metric" in self.describe
                else "the selection score",
                trainer.step,
            )  # fmt: skip
            return {**sel, "value": None, "step": trainer.step, "restored": False}
        best = read_checkpoint(self.path, "train_best")
        state = {"model": best["state_dict"], **best["provenance"]}
        if state["step"] != self.best["step"]:
            raise RuntimeError(
                f"{self.path} holds step {state['step']} but the best evaluation was at step "
                f"{self.best['step']}; the run folder was modified, re-run with a new --out"
            )
        trainer.module.load_state_dict(state["model"])
        log.info("kept the weights of step %d (best score %.4g) of %d steps",
                 self.best["step"], self.best["score"], trainer.step)  # fmt: skip
        return {**sel, "value": self.value(), "step": self.best["step"], "restored": True}

    def value(self) -> float | None:
        """The best evaluation's value: its ``describe["metric"]`` (as logged), else its score."""
        if self.best is None:
            return None
        return self.best["metrics"].get(self.describe.get("metric", ""), self.best["score"])


def select_metric_callback(cfg: TrainConfig, path: Path) -> ModelSelection:
    """``TrainConfig.select_metric``/``select_mode`` as a ``ModelSelection`` (no patience)."""
    name, sign = cfg.select_metric, (-1.0 if cfg.select_mode == "min" else 1.0)
    return ModelSelection(
        lambda m: sign * float(m[name]) if name in m else None,
        path,
        describe={"metric": name, "mode": cfg.select_mode},
    )


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``loss_fn`` over ``data``.

    data: a DataLoader (epochs are handled here; a ``ResumableSampler`` makes resume skip
    batches without loading them) or a factory ``epoch -> iterable of batches``.
    eval_fn(model) -> {name: float} runs on rank 0 every ``eval_every`` steps and at the end.
    hooks: (every, fn(trainer) -> {name: float}) for extra logging such as RankMe.
    callbacks: ``Callback`` objects (model selection, early stopping); ``cfg.select_metric``
    adds a ``ModelSelection`` of its own.
    A model with ``on_optimizer_step(step, max_steps)`` (e.g. an EMA teacher) is called after
    every optimizer step. Eval and hooks run under a forked RNG, so they never change training.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataLoader | Callable[[int], Iterable[Any]],
        cfg: TrainConfig,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        hooks: Sequence[tuple[int, Hook]] = (),
        title: str = "",
        note: str = "",
        callbacks: Sequence[Callback] = (),
    ):
        if cfg.accum_steps < 1 or cfg.max_steps < 1:
            raise ValueError("accum_steps and max_steps must be >= 1")
        if cfg.select_mode not in ("min", "max"):
            raise ValueError(f"select_mode must be min or max, not {cfg.select_mode!r}")
        self.cfg = cfg
        self.rank, self.world = dist_info()
        self.is_main = self.rank == 0
        self.device = init_distributed() if self.world > 1 else pick_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.module, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters
            )
        self.loss_fn = loss_fn
        self.title = title  # of the loss-curve PNG (e.g. "slidefm align: <out>")
        self.note = note  # red caption under it (e.g. random-weight provenance)
        self.data = data
        self.eval_fn = eval_fn
        self.hooks = list(hooks)
        groups = param_groups or default_param_groups(self.module, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        sched = partial(
            lr_factor,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, sched)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_idx = 0  # batches consumed in the current epoch
        self.rows: list[dict[str, Any]] = []
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.callbacks = list(callbacks)
        self._select = select_metric_callback(cfg, self.best_path) if cfg.select_metric else None
        if self._select is not None:
            self.callbacks.insert(0, self._select)
        self.should_stop = False  # set by a callback (early stopping): fit() ends after this step
        self.selection: dict[str, Any] | None = None  # set by fit() when a finished run selects

    # ----------------------------------------------------------------- data
    def _epoch_batches(self, epoch: int, skip: int) -> Iterable[Any]:
        """Batches of ``epoch`` from batch ``skip`` on (skipped by the sampler when it can)."""
        if isinstance(self.data, DataLoader):
            loader = self.data
            for obj in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            if skip and isinstance(loader.sampler, ResumableSampler) and loader.batch_size:
                loader.sampler.set_start(skip * loader.batch_size)
                skip = 0
            with torch.random.fork_rng(devices=[]):  # iterator creation draws a seed
                it = iter(loader)
        else:
            it = iter(self.data(epoch))
        return itertools.islice(it, skip, None)

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state())
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "rng": rng,
            "world_size": self.world,
            "train_config": dataclasses.asdict(self.cfg),
            "metrics": self.rows,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "stopped": self.should_stop,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_<step>.pt`` atomically (rank 0), keep the newest few."""
        state = self.state_dict()  # collective under DDP: every rank calls it
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        if self.is_main:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            olds = sorted(p for p in self.ckpt_dir.iterdir() if CKPT_RE.match(p.name))
            for old in olds[: max(0, len(olds) - max(1, self.cfg.keep_checkpoints))]:
                old.unlink(missing_ok=True)
        if self.world > 1:
            dist.barrier()
        return path if self.is_main else None

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a ``save_checkpoint`` file: training continues exactly where it stopped."""
        state = load_torch_file(path, "training checkpoint", map_location="cpu", weights_only=True)
        keys = ("model", "optimizer", "step", "rng")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise CheckpointError(f"{path}: not a slidefm training checkpoint (lacks {missing})")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_idx = state["step"], state["epoch"], state["batch_idx"]
        self.rows = [r for r in state["metrics"] if r["step"] <= self.step]
        self._load_callbacks(state)
        if state["world_size"] == self.world:
            set_rng_state(state["rng"][self.rank])
        else:
            log.warning(
                "checkpoint was written by %d ranks, now %d: RNG re-seeded, resume is not exact",
                state["world_size"],
                self.world,
            )
            seed_everything(self.cfg.seed + 1000 * self.step + self.rank)
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    def _load_or_fall_back(self, path: Path) -> None:
        """Load ``path``; under ``resume=auto`` an unreadable one (truncated by a full disk or
        a kill during a non-atomic copy) is named and the next older checkpoint is tried."""
        cands = [path]
        if self.cfg.resume == "auto":
            cands += [p for p in checkpoints_newest_first(self.ckpt_dir) if p != path]
        for i, cand in enumerate(cands):
            try:
                self.load_checkpoint(cand)
                return
            except CheckpointError as e:
                if i + 1 == len(cands):
                    raise CheckpointError(
                        f"{e}; no readable checkpoint left in {self.ckpt_dir} "
                        "(delete them, or --set train.resume=none to start over)"
                    ) from e
                log.warning("%s; falling back to the previous checkpoint %s", e, cands[i + 1])

    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            if self.is_main:
                clean_stale_tmp(self.ckpt_dir)
            return latest_checkpoint(self.ckpt_dir)
        if not Path(r).is_file():
            raise FileNotFoundError(f"resume checkpoint {r} not found")
        return Path(r)

    # ------------------------------------------------------------ callbacks
    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / BEST_CKPT

    def _load_callbacks(self, state: dict[str, Any]) -> None:
        """Callback states of a checkpoint; one written before callbacks (``best`` only) gives
        its select_metric best to the ``ModelSelection`` of ``cfg.select_metric``."""
        self.should_stop = bool(state.get("stopped", False))
        saved = state.get("callbacks")
        if saved is not None and len(saved) == len(self.callbacks):
            for cb, st in zip(self.callbacks, saved):
                cb.load_state_dict(st)
        elif state.get("best") and self._select is not None:
            old = state["best"]
            sign = -1.0 if old["mode"] == "min" else 1.0
            self._select.best = {"score": sign * old["value"], "step": old["step"], "index": 0,
                                 "metrics": {old["metric"]: old["value"]}}  # fmt: skip

    def _sync_callbacks(self) -> None:
        """Evaluations run on rank 0 only: every rank takes rank 0's callback states and stop."""
        if self.world > 1 and self.callbacks:
            obj = [([cb.state_dict() for cb in self.callbacks], self.should_stop)]
            dist.broadcast_object_list(obj, src=0)
            states, self.should_stop = obj[0]
            for cb, st in zip(self.callbacks, states):
                cb.load_state_dict(st)

    # -------------------------------------------------------------- logging
    def _row(self, step: int) -> dict[str, Any]:
        if not self.rows or self.rows[-1]["step"] != step:
            self.rows.append({"step": step, "epoch": self.epoch})
        return self.rows[-1]

    def write_metrics(self) -> None:
        """``metrics.csv`` (one row per logged step, union of columns) and ``loss_curve.png``."""
        if not self.is_main or not self.rows:
            return
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        path = self.out_dir / "metrics.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        sel = self.selection["step"] if self.selection and self.selection["restored"] else None
        plot_loss_curve(
            self.rows,
            self.out_dir / "loss_curve.png",
            title=self.title,
            selected_step=sel,
            selected_by=self.cfg.select_metric,
            note=self.note,
        )

    def _log(self, window: dict[str, list], pbar: tqdm) -> None:
        n = len(window["loss"])
        if n == 0:
            return
        loss = torch.stack(window.pop("loss")).float().mean()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        row = self._row(self.step)
        row["loss"] = float(loss)
        if not math.isfinite(row["loss"]) and self.precision != "fp16":
            raise RuntimeError(
                f"loss is {row['loss']} at step {self.step}; lower the lr or check the inputs"
            )
        row["lr"] = window.pop("lr")[-1]
        for k, vals in window.items():
            row[k] = float(np.mean(vals))
        row["time_s"] = round(time.time() - self._t0, 3)
        window.clear()
        pbar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}")

    def _run_side(self, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Eval / hook on rank 0 with the model in eval mode and the training RNG untouched."""
        if not self.is_main:
            return {}
        was_training = self.module.training
        self.module.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = fn()
        self.module.train(was_training)
        metrics = {k: float(v) for k, v in (out or {}).items()}
        self._row(self.step).update(metrics)
        return metrics

    # ----------------------------------------------------------------- step
    def _optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm)

    def fit(self, stop_at_step: int | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (or ``stop_at_step``, which leaves the schedule unchanged).

        Resumes from the latest checkpoint per ``cfg.resume``; returns the logged rows.
        """
        cfg = self.cfg
        path = self._resume_path()
        if path is not None:
            self._load_or_fall_back(path)
        else:
            seed_everything(cfg.seed + self.rank)
        target = min(cfg.max_steps, stop_at_step or cfg.max_steps)
        self._t0 = time.time()
        self.model.train()
        window: dict[str, list] = defaultdict(list)
        micro = 0
        pbar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (self.is_main and cfg.progress),
            desc="train",
            dynamic_ncols=True,
        )
        while self.step < target and not self.should_stop:
            n_batches = 0
            for batch in self._epoch_batches(self.epoch, self.batch_idx):
                n_batches += 1
                self.batch_idx += 1
                micro += 1
                sync = micro % cfg.accum_steps == 0
                no_sync = self.world > 1 and not sync
                with self.model.no_sync() if no_sync else contextlib.nullcontext():
                    batch = to_device(batch, self.device)
                    with autocast(self.device, self.precision):
                        loss, metrics = self.loss_fn(self.model, batch)
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                window["loss"].append(loss.detach())
                for k, v in metrics.items():
                    window[k].append(float(v))
                if not sync:
                    continue
                lr = self.optimizer.param_groups[0]["lr"]
                window["grad_norm"].append(self._optimizer_step())
                window["lr"].append(lr)
                self.step += 1
                hook = getattr(self.module, "on_optimizer_step", None)
                if hook is not None:
                    hook(self.step, cfg.max_steps)
                self._after_step(window, pbar)
                if self.step >= target or self.should_stop:
                    break
            else:
                if n_batches == 0 and self.batch_idx == 0:
                    raise ValueError("the training data yielded no batches; check the dataset")
                self.epoch += 1
                self.batch_idx = 0
                continue
            break
        pbar.close()
        self._finish()
        return self.rows

    def _finish(self) -> None:
        """End of fit(): a finished or stopped run gives its callbacks ``on_fit_end`` (model
        selection loads the kept weights), then the metrics are written."""
        if self.step >= self.cfg.max_steps or self.should_stop:
            for cb in self.callbacks:
                cb.on_fit_end(self)
        self.write_metrics()

    def _after_step(self, window: dict[str, list], pbar: tqdm) -> None:
        cfg, s = self.cfg, self.step
        final = s == cfg.max_steps
        pbar.update(1)
        if s % max(1, cfg.log_every) == 0 or final:
            self._log(window, pbar)
        if self.eval_fn is not None and ((cfg.eval_every and s % cfg.eval_every == 0) or final):
            metrics = self._run_side(lambda: self.eval_fn(self.module))
            if self.is_main:
                for cb in self.callbacks:
                    cb.on_evaluate(self, metrics)
            self._sync_callbacks()
        for every, fn in self.hooks:
            if s % every == 0 or final:
                self._run_side(lambda fn=fn: fn(self))
        if (cfg.ckpt_every and s % cfg.ckpt_every == 0) or final or self.should_stop:
            self.save_checkpoint()
            self.write_metrics()


def plot_loss_curve(
    rows: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    selected_step: int | None = None,
    note: str = "",
    selected_by: str = "",
) -> Path:
    """PNG: losses (training solid, evaluations dashed with markers), other evaluation metrics
    (e.g. validation Recall@K, RankMe) and the learning rate against optimizer step; a dotted
    line marks the step whose weights the run kept (``selected_step``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(dict.fromkeys(k for r in rows for k in r))
    skip = {"step", "epoch", "lr", "time_s", "grad_norm"}
    loss_cols = [c for c in cols if "loss" in c]

    # Evaluation metrics (eval_fn / hooks): named val_*/eval_*/test_*, or logged only at some
    # rows; per-step training extras (logit scale, batch accuracy) stay in metrics.csv only.
    def _is_eval(c: str) -> bool:
        return c.startswith(("val", "eval", "test")) or sum(c in r for r in rows) < len(rows)

    eval_cols = [c for c in cols if c not in skip and c not in loss_cols and _is_eval(c)]
    panels = 2 + bool(eval_cols)
    ratios = (3, 2, 1) if eval_cols else (3, 1)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.2 * panels + 1.2), sharex=True,
                             height_ratios=ratios)  # fmt: skip
    ax, ax_lr = axes[0], axes[-1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def _series(c: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[c]) for r in rows if c in r and r[c] is not None]
        return ([p[0] for p in pts], [float(p[1]) for p in pts])

    for i, c in enumerate(loss_cols):
        xs, ys = _series(c)
        is_eval = _is_eval(c)
        label = c.replace("_", " ")
        if c == "loss":
            label = "training loss (mean over log window)"
        ax.plot(xs, ys, label=label, color=colours[i % len(colours)],
                ls="--" if is_eval else "-", marker="o" if is_eval or len(xs) < 30 else None,
                ms=4, lw=1.6)  # fmt: skip
    ax.set_ylabel("loss")
    if loss_cols:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if eval_cols:
        ax_m = axes[1]
        for i, c in enumerate(eval_cols):
            xs, ys = _series(c)
            ax_m.plot(xs, ys, label=c.replace("_", " "), marker="o", ms=4,
                      ls=("-", "--", ":", "-.")[i % 4], color=colours[(i + 3) % len(colours)])  # fmt: skip
        ax_m.set_ylabel("evaluation")
        ax_m.legend(fontsize=8)
        ax_m.grid(alpha=0.3)
    lr = _series("lr")
    if lr[0]:
        ax_lr.plot(*lr, color="tab:gray")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if selected_step is not None:
        for a in axes:
            a.axvline(selected_step, color="k", ls=":", lw=1.2)
        why = f" (best {selected_by.replace('_', ' ')})" if selected_by else ""
        ax.plot([], [], color="k", ls=":", label=f"kept weights: step {selected_step}{why}")
        ax.legend(fontsize=8)
    fig.suptitle(title or "training curves", fontsize=10)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    add_figure_note(fig, note)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
