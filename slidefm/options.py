"""Command-line options shared by several commands, in one light module (argparse only) that
``cli.py``, the pipelines and the library import, so ``slidefm --help`` never loads torch."""

from __future__ import annotations

import argparse
from typing import Any

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


# -- commands that apply an alignment checkpoint (zero-shot, retrieve) ----------------------
# Options of ``add_input_args``/``add_run_args`` that ``run_kwargs`` forwards by name to
# run_zero_shot / run_retrieve (--checkpoint and --out are positional there).
RUN_OPTIONS = ("features", "embeddings", "max_tiles", "n_boot", "seed", "device", "include_seen")


def add_input_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and the slides: ``--features`` DIR or ``--embeddings`` H5."""
    p.add_argument(
        "--checkpoint", required=True, help="alignment checkpoint (<align out>/align.pt)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="folder of <slide_id>.h5 tile-feature files")
    src.add_argument(
        "--embeddings", help="slide-embedding H5 (same slide encoder as the checkpoint)"
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Tile subset, bootstrap, device, output folder and seed (the last options of both)."""
    p.add_argument("--max-tiles", type=int, default=None, help="random tile subset per slide")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed, recorded (default 0)")
    p.add_argument(
        "--include-seen",
        action="store_true",
        help="also score patients the checkpoint was trained on (left out by default: leakage)",
    )


def run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``RUN_OPTIONS`` from parsed command-line options."""
    return {name: getattr(args, name) for name in RUN_OPTIONS}
