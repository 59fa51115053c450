"""Does ``pretrain-tiles`` (DINO + iBOT + KoLeo with online patching) teach vit_tiny_dev the
synthetic tissue types better than random weights?

1. a synthetic cohort (``slidefm synth-cohort``; tissue type of every tile in ``cells.csv``);
2. for each seed: ``pretrain-tiles`` on the TRAIN-split slides from random init (no labels;
   the labelled kNN column in metrics.csv is a monitor on training slides only);
3. ``encode-slides`` of the held-out (val + test) patients' slides with the trained teacher
   and with the same architecture at random weights (seeded like the run's start point);
4. ``probe-tiles``: linear, kNN-20 and 1/5/10-shot (prototype and linear) probes of tile type
   on held-out patients, the same patient splits for every encoder, and the paired gain
   (SSL − the same seed's random init, same split) per probe;
5. optionally the downstream effect, SSL vs random tile weights with the same seeds: ``--mil``
   (``mil train`` on every slide of this cohort: biomarker_bag, ABMIL, patient-grouped 5-fold
   CV, via examples/mil_biomarker.py's steps) and ``--zero-shot`` (examples/zero_shot.py on its
   own cohort with ``--tile-weights``: slide-encoder pretraining, alignment and prompt-only
   subtyping of its test patients, seed 0's SSL weights vs random weights).

Prints JSON (also ``OUT/results.json``): balanced accuracy mean ± sd over (seed × split),
RankMe / ODCorr of the teacher at step 0 and at the end of every run, each run's wall and CPU
minutes, and the downstream AUROC / balanced accuracy with patient-bootstrap 95% CIs. CPU only.
Measured figures and the command: README, "Tile-encoder SSL".

    python examples/pretrain_tiles.py --out outputs/tile_ssl --parallel 3 --mil
    python examples/pretrain_tiles.py --out outputs/tile_ssl_q --quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.encoders.cohort import run_encode
from slidefm.encoders.encode_config import EncodeConfig
from slidefm.eval.tile_probes import run_probe_tiles
from slidefm.io.manifest import read_manifest
from slidefm.train.tile_ssl import WEIGHTS_FILE
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.synthetic import generate_cohort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mil_biomarker import step, summarise  # noqa: E402  (the MIL example's steps, reused)

ENCODER = "vit_tiny_dev"
REPO = Path(__file__).resolve().parent.parent


def encode(jobs: list[SlideJob], weights: str, feat_dir: Path, seed: int) -> None:
    """``encode-slides`` of ``jobs`` with vit_tiny_dev at ``weights`` (resumable)."""
    cfg = EncodeConfig(encoder=ENCODER, weights=weights, batch_size=64, num_workers=0, qc=False)
    res = run_encode(jobs, cfg, feat_dir, seed=seed, progress=False)
    failed = [r for r in res if r.status == "failed"]
    if failed:
        raise RuntimeError(f"encode-slides failed on {failed[0].slide_id}: {failed[0].error}")


def paired_gains(table: pd.DataFrame) -> dict[str, dict]:
    """Per probe: SSL − random balanced accuracy of the same init seed on the same patient
    split → mean ± sd over the (seed, split) pairs and how many of them are positive."""
    t = table.assign(init=table["encoder"].str.split("_seed").str[1])
    wide = t.pivot_table(index=["probe", "init", "seed"], columns="kind", values="bacc")
    out = {}
    for probe, g in (wide["ssl"] - wide["random"]).groupby(level="probe", sort=False):
        out[str(probe)] = {
            "mean": round(float(g.mean()), 4),
            "sd": round(float(g.std(ddof=1)), 4) if len(g) > 1 else 0.0,
            "positive": int((g > 0).sum()),
            "pairs": len(g),
        }
    return out


def run_mil(a: argparse.Namespace, manifest: Path, seeds: list[int]) -> dict:
    """``mil train`` (biomarker_bag, ABMIL) on every slide with each encoder's features; MIL
    seed = the encoder's seed, so the SSL and random runs of a seed share folds and init.
    → {kind: {"per_seed": {seed: summarise(...)}, "auroc": mean ± sd over seeds}}."""
    out: dict[str, dict] = {}
    for kind in ("random", "ssl"):
        per_seed = {}
        for seed in seeds:
            run_dir = a.out / "mil" / f"{kind}_seed{seed}"
            step(["mil", "train", "--manifest", str(manifest), "--features",
                  str(a.out / "features" / f"{kind}_seed{seed}"), "--label", "biomarker_bag",
                  "--model", "abmil", "--folds", str(a.mil_folds), "--seeds", str(seed),
                  "--epochs", str(a.mil_epochs), "--out", str(run_dir), "--no-progress"])  # fmt: skip
            per_seed[seed] = summarise(run_dir)
        auc = np.array([r["auroc"][0] for r in per_seed.values()])
        out[kind] = {
            "per_seed": per_seed,
            "auroc_mean_sd_over_seeds": [
                round(float(auc.mean()), 3),
                round(float(auc.std(ddof=1)) if len(auc) > 1 else 0.0, 3),
            ],
        }
    return out


def run_zero_shot_pair(a: argparse.Namespace, ssl_weights: Path, seed: int) -> dict:
    """examples/zero_shot.py on one cohort (its own, ``--zs-slides`` slides, seed ``seed``) with
    the SSL tile weights and with random tile weights (init seed ``seed``); everything after the
    tile encoder (slide-encoder pretraining, alignment, prompts, test patients) is identical.
    → {kind: balanced accuracy / weighted F1 / macro AUROC with patient-bootstrap 95% CIs}."""
    out = {}
    for kind, weights in (("random", "random"), ("ssl", str(ssl_weights))):
        zs_out = a.out / "zero_shot" / f"{kind}_seed{seed}"
        cmd = [sys.executable, str(REPO / "examples" / "zero_shot.py"), "--out", str(zs_out),
               "--n-slides", str(a.zs_slides), "--seed", str(seed), "--tile-weights", weights,
               "--no-ablation", "--workers", "1"] + (["--quick"] if a.quick else [])  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        res = json.loads((zs_out / "zero_shot" / "summary.json").read_text())["pretrained"]
        out[kind] = {
            k: {q: round(res[k][q], 3) for q in ("value", "lo", "hi")}
            for k in ("balanced_accuracy", "f1_weighted", "auroc_macro")
            if k in res
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-slides", type=int, default=80)
    ap.add_argument("--seeds", default="0,1,2", help="SSL / random-init seeds")
    ap.add_argument("--split-seeds", default="0,1,2", help="probe patient-split seeds")
    ap.add_argument("--config", default="synthetic_cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--parallel", type=int, default=1, help="SSL runs at a time")
    ap.add_argument(
        "--mil",
        action="store_true",
        help="downstream: also encode the train slides and run `mil train` (biomarker_bag, "
        "abmil) on every slide with each encoder's features, same folds and seeds",
    )
    ap.add_argument("--mil-folds", type=int, default=5)
    ap.add_argument("--mil-epochs", type=int, default=20)
    ap.add_argument(
        "--zero-shot",
        action="store_true",
        help="downstream: examples/zero_shot.py (slide-encoder pretraining, alignment, zero-shot "
        "subtyping of its test patients) with seed 0's SSL weights and with random weights",
    )
    ap.add_argument("--zs-slides", type=int, default=300, help="zero-shot cohort size")
    ap.add_argument("--quick", action="store_true", help="tiny cohort, a few steps: runs only")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    split_seeds = tuple(int(s) for s in a.split_seeds.split(","))
    overrides = list(a.overrides)
    n_slides = a.n_slides
    if a.quick:
        n_slides, seeds, split_seeds = 16, seeds[:1], split_seeds[:2]
        overrides = [
            "train.max_steps=3",
            "train.eval_every=3",
            "data.batch_size=4",
            "data.num_workers=0",
            "eval.n_tiles=32",
            "eval.max_labelled=60",
            "patches.samples_per_epoch=64",
            *overrides,
        ]
    cohort = a.out / "cohort"
    generate_cohort(cohort, n_slides, seed=0, workers=1, progress=False)
    man = read_manifest(cohort / "manifest.csv")
    jobs = {
        s: [SlideJob(r.slide_id, r.path) for r in g.itertuples()] for s, g in man.groupby("split")
    }
    held_out = jobs.get("val", []) + jobs.get("test", [])
    cells = str(cohort / "cells.csv")
    runs, features = {}, {}
    run_dirs = {seed: a.out / f"ssl_seed{seed}" for seed in seeds}
    ov = [f"eval.labels={cells}", "train.progress=false", *overrides]
    procs: list[subprocess.Popen] = []
    for seed in seeds:  # the CLI, --parallel runs at a time (each its own process)
        cmd = [
            sys.executable,
            "-m",
            "slidefm.cli",
            "pretrain-tiles",
            "--manifest",
            str(cohort / "manifest.csv"),
            "--split",
            "train",
            "--encoder",
            ENCODER,
            "--weights",
            "random",
            "--out",
            str(run_dirs[seed]),
            "--config",
            a.config,
            "--seed",
            str(seed),
        ] + [x for o in ov for x in ("--set", o)]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}))
        while sum(p.poll() is None for p in procs) >= a.parallel:
            time.sleep(2)
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"pretrain-tiles failed: {' '.join(map(str, p.args))}")
    for seed in seeds:
        run_dir = run_dirs[seed]
        info = json.loads((run_dir / "run_config.json").read_text())
        final = info["final"]
        runs[seed] = {
            "steps": info["steps"],
            "step0": info["step0_eval"],
            "final": {
                k: final[k] for k in final if k in ("rankme", "odcorr") or k.startswith("knn")
            },
            "train_minutes": round(final.get("time_s", float("nan")) / 60, 2),
            "cpu_minutes": info.get("cpu_minutes"),
        }
        for kind, weights in (("ssl", str(run_dir / WEIGHTS_FILE)), ("random", "random")):
            feat_dir = a.out / "features" / f"{kind}_seed{seed}"
            encode(held_out, weights, feat_dir, seed)
            features[f"{kind}_seed{seed}"] = str(feat_dir)
    table = run_probe_tiles(
        features, cells, str(cohort / "manifest.csv"), a.out / "probe", seeds=split_seeds
    )
    table["kind"] = table["encoder"].str.split("_").str[0]
    agg = table.groupby(["kind", "probe"], sort=False)["bacc"].agg(["mean", "std", "count"])
    probes = {
        kind: {
            p: {"mean": round(r["mean"], 4), "sd": round(r["std"], 4), "n": int(r["count"])}
            for (k, p), r in agg.iterrows()
            if k == kind
        }
        for kind in ("random", "ssl")
    }
    gains = paired_gains(table)
    enc_summary = json.loads((a.out / "probe" / "summary.json").read_text())["encoders"]
    same_slide = {
        name: {k: round(v, 4) for k, v in e.items() if k.startswith("same_slide")}
        for name, e in enc_summary.items()
    }
    if a.mil:  # the feature folders grow to every slide; the probes above read val/test only
        all_jobs = [j for js in jobs.values() for j in js]
        for seed in seeds:
            for kind, weights in (
                ("ssl", str(run_dirs[seed] / WEIGHTS_FILE)),
                ("random", "random"),
            ):
                encode(all_jobs, weights, a.out / "features" / f"{kind}_seed{seed}", seed)
        mil = run_mil(a, cohort / "manifest.csv", seeds)
    if a.zero_shot:
        zs = run_zero_shot_pair(a, run_dirs[seeds[0]] / WEIGHTS_FILE, seeds[0])
    result = {
        "encoder": ENCODER,
        "weights_note": "baseline = RANDOM weights (same init as each SSL run's step 0)",
        "cohort": {
            "slides": n_slides,
            "train_slides": len(jobs["train"]),
            "probe_slides": len(held_out),
        },
        "seeds": seeds,
        "split_seeds": list(split_seeds),
        "probes_balanced_accuracy": probes,
        "paired_gain_ssl_minus_random": gains,
        "neighbours_from_the_same_slide": same_slide,
        "ssl_runs": runs,
        "quick": a.quick,
    }
    if a.mil:
        result["mil_biomarker_bag_abmil"] = mil
    if a.zero_shot:
        result["zero_shot_subtype"] = zs
    (a.out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    pd.set_option("display.width", 120)
    np.set_printoptions(precision=3)
    main()
