"""The output folder of a resumable training run (``slidefm pretrain`` / ``slidefm align``).

Both commands keep ``run_config.json`` (resolved config + hash) beside ``checkpoints/`` so a
re-run of the same command resumes, and a re-run with another config is refused instead of
silently mixing two runs' checkpoints. The pieces they share live here, once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from slidefm.config import ConfigError, from_dict
from slidefm.io.atomic import atomic_path
from slidefm.io.provenance import figure_note
from slidefm.train.loop import TrainConfig, Trainer, latest_checkpoint

RUN_CONFIG = "run_config.json"
# Keys of the run info that every final model checkpoint records as provenance.
PROVENANCE_KEYS = ("config_hash", "seed", "config_name", "steps")
# ... and, when the run selected its weights by a validation metric, which step they are from.
OPTIONAL_PROVENANCE_KEYS = ("selected",)


def check_train_section(train: dict[str, Any]) -> None:
    """Validate a config's ``train`` section; ``out_dir``/``seed`` come from the CLI, so a
    config that sets them would be silently overridden: refuse it instead."""
    bad = {"out_dir", "seed"} & set(train)
    if bad:
        raise ConfigError(f"train.{'/'.join(sorted(bad))} come from --out/--seed, not the config")
    from_dict(TrainConfig, train)


def check_out_dir(out: Path, run_hash: str) -> None:
    """Refuse to resume checkpoints of a different config into the same folder."""
    prev = out / RUN_CONFIG
    if latest_checkpoint(out / "checkpoints") is None or not prev.is_file():
        return
    old = json.loads(prev.read_text()).get("config_hash")
    if old != run_hash:
        raise ValueError(
            f"{out} holds checkpoints of another config (hash {old}, now {run_hash}); "
            "use a new --out, or --set train.resume=none to start over there"
        )


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write (non-JSON values such as paths become strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def fit_run(
    model: nn.Module,
    loader: DataLoader,
    tcfg: TrainConfig,
    info: dict[str, Any],
    eval_fn: Callable[[Any], dict[str, float]],
    stop_at_step: int | None = None,
    title: str = "",
) -> bool:
    """Train ``model`` (its forward returns ``(loss, metrics)``), record ``steps``, the
    ``final`` metrics row and, with ``tcfg.select_metric``, the ``selected`` step (whose
    weights ``model`` then holds) in ``info``; True when the run reached ``max_steps`` (not
    stopped early), i.e. when the caller should write its final model."""
    trainer = Trainer(
        model,
        lambda mdl, batch: mdl(batch),
        loader,
        tcfg,
        eval_fn=eval_fn,
        title=title,
        note=figure_note(info),
    )
    rows = trainer.fit(stop_at_step=stop_at_step)
    info["steps"] = trainer.step
    info["final"] = rows[-1] if rows else {}
    if trainer.selection is not None:
        sel = trainer.selection
        info["selected"] = sel
        info["selected_metrics"] = next((r for r in rows if r["step"] == sel["step"]), {})
    return trainer.step >= tcfg.max_steps


def save_final(
    out: Path,
    info: dict[str, Any],
    save: Callable[[Path, dict[str, Any]], Any],
    name: str,
    info_key: str,
    extra: dict[str, Any],
) -> None:
    """Write the finished run's model with ``save(out / name, provenance)`` (e.g. a model's
    ``save_checkpoint``; provenance = the run's ``PROVENANCE_KEYS``, then ``extra``), record its
    path in ``info[info_key]`` and rewrite run_config.json. Call on rank 0 only."""
    path = out / name
    prov = {k: info[k] for k in PROVENANCE_KEYS}
    prov.update({k: info[k] for k in OPTIONAL_PROVENANCE_KEYS if k in info})
    save(path, {**prov, **extra})
    info[info_key] = str(path)
    write_json(out / RUN_CONFIG, info)
