"""Shared steps of the vision–language examples (zero_shot.py, report_retrieval.py).

slides → tile features → slide-encoder pretraining → slide↔report alignment, each step a
``slidefm`` command whose outputs are resumable, so running the second example after the first
(same ``--out``) reuses everything:

    synthetic cohort (slidefm.wsi.synthetic)   → <out>/cohort/{slides/, manifest.csv}
    slidefm encode-slides (vit_tiny_dev)      → <out>/features/*.h5
    slidefm pretrain --config synthetic       → <out>/pretrain/encoder.pt   (train split only)
    slidefm align --config tiny               → <out>/align/align.pt        (train split only)
    … with a RANDOM slide encoder (ablation)  → <out>/align_random_encoder/align.pt
    the bundled real slide (CMU-1-Small-Region.svs), same tile encoder → <out>/real_features/

The tile encoder is a tiny ViT with RANDOM weights (no model hub offline): features are a fixed
random projection of the pixels, good enough for the synthetic cohort, not a pretrained model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "CMU-1-Small-Region.svs"
TILE_ENCODER = ("--encoder", "vit_tiny_dev", "--weights", "random")
RUNS = ("pretrained", "random_encoder")  # alignment runs: pretrained vs random slide encoder
NOTE = "NOTE: tile features come from a tiny ViT with RANDOM weights (offline demo)."


# --quick: a smoke run of every step (tests/test_examples.py); its numbers mean nothing.
QUICK = {"n_slides": 24, "cells": 6, "pretrain_steps": 40, "align_steps": 30, "n_boot": 100}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="outputs/vl", help="output folder (re-run to resume)")
    ap.add_argument(
        "--n-slides",
        type=int,
        default=300,
        help="synthetic cohort size (300: ~60 test slides, enough to separate the ablation)",
    )
    ap.add_argument("--cells", type=int, default=10, help="synthetic slide side, in 256-px tiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes drawing synthetic slides")
    ap.add_argument("--pretrain-config", default="synthetic", help="configs/pretrain/ name")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
    ap.add_argument("--align-steps", type=int, default=300)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs")
    ap.add_argument("--no-ablation", action="store_true", help="skip the random-encoder run")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test of every step in ~2 min ({QUICK}); the numbers mean nothing",
    )


def apply_quick(a: argparse.Namespace) -> argparse.Namespace:
    """``--quick`` overrides the sizes with ``QUICK`` (and says so)."""
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
        print(f"--quick: {QUICK} (smoke test: the numbers below mean nothing)", flush=True)
    return a


def parser(description: str) -> argparse.ArgumentParser:
    """An example's command line: its docstring as help, the shared options of ``add_args``."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    add_args(ap)
    return ap


def aligned_runs(paths: dict[str, Path]) -> list[tuple[str, Path]]:
    """(run name, align.pt) of every alignment run ``prepare`` made (no ablation: one)."""
    return [(run, paths[run]) for run in RUNS if run in paths]


def test_split(paths: dict[str, Path], a: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``run_zero_shot`` / ``run_retrieve`` that score the held-out
    patients' slides (split == test) by subtype, from the cohort's tile features."""
    return {
        "features": str(paths["features"]),
        "label_column": "subtype",
        "split": "test",
        "n_boot": a.n_boot,
        "seed": a.seed,
    }


def _cli(args: list[str]) -> None:
    from slidefm.cli import main

    t0 = time.time()
    print(f"$ slidefm {' '.join(args)}", flush=True)
    rc = main(args)
    if rc:
        sys.exit(f"step failed (exit {rc}): slidefm {' '.join(args)}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def _sets(*items: str) -> list[str]:
    return [x for it in items for x in ("--set", it)]


def prepare(a: argparse.Namespace) -> dict[str, Path]:
    """Run (or resume) every step; returns the paths the examples read."""
    from slidefm.wsi.synthetic import generate_cohort

    apply_quick(a)
    out = Path(a.out)
    cohort, feats = out / "cohort", out / "features"
    print(f"[1/5] synthetic cohort: {a.n_slides} slides → {cohort}", flush=True)
    generate_cohort(cohort, n_slides=a.n_slides, seed=a.seed, workers=a.workers, cells=a.cells)
    manifest = cohort / "manifest.csv"
    print("[2/5] tile features (tiny ViT, RANDOM weights)", flush=True)
    _cli(["encode-slides", "--manifest", str(manifest), "--out", str(feats), *TILE_ENCODER,
          "--no-qc", "--no-progress", "--num-workers", "0", "--seed", str(a.seed)])  # fmt: skip
    pre = out / "pretrain"
    if not (pre / "encoder.pt").is_file():
        print("[3/5] self-supervised slide-encoder pretraining (train split)", flush=True)
        steps = [f"train.max_steps={a.pretrain_steps}"] if a.pretrain_steps else []
        _cli(["pretrain", "--config", a.pretrain_config, "--features", str(feats), "--manifest",
              str(manifest), "--split", "train", "--out", str(pre), "--seed", str(a.seed),
              *_sets(*steps, "train.progress=false")])  # fmt: skip
    runs = {"pretrained": (out / "align", str(pre / "encoder.pt"))}
    if not a.no_ablation:
        from slidefm.train.pretrain import load_run_config

        arch = load_run_config(a.pretrain_config, []).encoder  # same architecture, random
        runs["random_encoder"] = (out / "align_random_encoder", f"random:{arch}")
    paths = {"out": out, "manifest": manifest, "features": feats}
    for name, (d, enc) in runs.items():
        if not (d / "align.pt").is_file():
            print(f"[4/5] slide↔report alignment, slide encoder: {name}", flush=True)
            _cli(["align", "--config", "tiny", "--features", str(feats), "--manifest",
                  str(manifest), "--slide-encoder", enc, "--out", str(d), "--seed", str(a.seed),
                  *_sets(f"train.max_steps={a.align_steps}", "train.progress=false",
                         "data.val_label_column=subtype")])  # fmt: skip
        paths[name] = d / "align.pt"
    real = out / "real_features"
    print(f"[5/5] the bundled real slide {SAMPLE.name}, same tile encoder", flush=True)
    _cli(["encode-slides", str(SAMPLE), "--out", str(real), *TILE_ENCODER, "--no-qc",
          "--no-progress", "--num-workers", "0", "--seed", str(a.seed)])  # fmt: skip
    paths["real_features"] = real
    return paths
