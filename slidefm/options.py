"""Command-line options shared by several commands, in one light module (argparse only) that
``cli.py``, the pipelines and the library import, so ``slidefm --help`` never loads torch."""

from __future__ import annotations

import argparse

# Why a manifest without patients is refused by default (printed by the option and the error).
SLIDE_LEVEL_RISK = (
    "slides of one patient can land in different folds (train and test), which inflates the metrics"
)


def add_common(p: argparse.ArgumentParser, config_subdir: str | None = None) -> None:
    """--seed for every pipeline; --config and its --set overrides for those with a YAML config
    (a command without one takes no --set: an override it would ignore is not offered)."""
    if config_subdir is not None:
        p.add_argument(
            "--config",
            default=None,
            help=f"YAML config (path or name under configs/{config_subdir}/)",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value (repeatable)",
        )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed, recorded in outputs (default 0)"
    )


def add_overwrite(p: argparse.ArgumentParser) -> None:
    """The ``--overwrite`` option of commands whose --out holds one run."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard another run found in --out (other inputs/seed/config) instead of refusing",
    )


def add_slide_level_only(p: argparse.ArgumentParser) -> None:
    """The ``--slide-level-only`` option of the commands that use ``read_cohort_manifest``."""
    p.add_argument(
        "--slide-level-only",
        action="store_true",
        help=f"accept a manifest without case_id (each slide its own patient); risk: {SLIDE_LEVEL_RISK}",
    )
