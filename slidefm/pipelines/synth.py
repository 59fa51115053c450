"""``slidefm synth-cohort``: a synthetic pyramidal-TIFF cohort with planted labels and reports.

Options come from ``configs/synth/<name>.yaml`` (fields of ``CohortOptions``), then the
explicit flags below, then ``--set`` overrides (YAML < flags < ``--set``, as every command). Re-running the same command resumes: finished slides
(same seed and options) are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from slidefm.config import flag_values, load_config
from slidefm.options import add_common

# Explicit flag → CohortOptions field (flags left unset keep the config's value).
FLAGS = {"cells": "cells", "cell_px": "cell_px", "pen_prob": "pen_prob", "quality": "jpeg_quality"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth-cohort",
        help="write a synthetic slide cohort with known labels (TIFFs, manifest, reports)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (manifest.csv, slides/, …)")
    p.add_argument("--n-slides", type=int, default=200, help="number of slides (default 200)")
    p.add_argument("--cells", type=int, default=None, help="grid side in cells (default 12)")
    p.add_argument(
        "--cell-px",
        type=int,
        default=None,
        help="cell edge in level-0 px at 0.5 µm/px (default 256, the tiler's tile size)",
    )
    p.add_argument("--pen-prob", type=float, default=None, help="share of slides with pen marks")
    p.add_argument("--quality", type=int, default=None, help="JPEG quality (default 85)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(p, config_subdir="synth")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    """``CohortOptions``: YAML < the explicit flags < ``--set`` (``slidefm.config``)."""
    from slidefm.wsi.synthetic import CohortOptions

    flags = flag_values(args, FLAGS)
    return load_config(CohortOptions, args.config, args.overrides, "synth", flags)


def run(args: argparse.Namespace) -> int:
    from slidefm.wsi.synthetic import generate_cohort

    opts = options_from_args(args)
    t0 = time.time()
    manifest = generate_cohort(
        Path(args.out),
        args.n_slides,
        seed=args.seed,
        workers=max(1, args.workers),
        progress=not args.no_progress,
        **dataclasses.asdict(opts),
    )
    summary = {
        "manifest": str(Path(args.out) / "manifest.csv"),
        "slides": len(manifest),
        "patients": int(manifest["case_id"].nunique()),
        "seed": args.seed,
        "options": dataclasses.asdict(opts),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))
    return 0
