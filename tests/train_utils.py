"""Test helper: the overrides that shrink a ``slidefm pretrain`` / ``align`` run to a few steps
while still exercising checkpointing, periodic eval and logging."""

from __future__ import annotations


def fast_train(batch_size: int) -> list[str]:
    """``--set`` overrides of a 6-step run: checkpoint and eval every 3 steps, log every step."""
    return [
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.ckpt_every=3",
        "train.eval_every=3",
        "train.log_every=1",
        "train.progress=false",
        f"data.batch_size={batch_size}",
    ]


def set_args(overrides: list[str]) -> list[str]:
    """Command-line form of config overrides: ``["--set", o1, "--set", o2, ...]``."""
    return [x for o in overrides for x in ("--set", o)]
