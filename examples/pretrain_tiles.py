"""Does ``pretrain-tiles`` (DINO + iBOT + KoLeo with online patching) teach vit_tiny_dev the
synthetic tissue types better than random weights?

1. a synthetic cohort (``slidefm synth-cohort``; tissue type of every tile in ``cells.csv``);
2. for each seed: ``pretrain-tiles`` on the TRAIN-split slides from random init (no labels;
   the labelled kNN column in metrics.csv is a monitor on training slides only);
3. ``encode-slides`` of the held-out (val + test) patients' slides with the trained teacher
   and with the same architecture at random weights (seeded like the run's start point);
4. ``probe-tiles``: linear, kNN-20 and 1/5/10-shot prototype probes of tile type on held-out
   patients, the same patient splits for every encoder.

Prints JSON (also ``OUT/results.json``): balanced accuracy mean ± sd over (seed × split),
RankMe / ODCorr of the teacher at step 0 and at the end of every run. CPU only.

    python examples/pretrain_tiles.py --out outputs/tile_ssl            # ~30-40 min, 2 cores
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

ENCODER = "vit_tiny_dev"
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-slides", type=int, default=80)
    ap.add_argument("--seeds", default="0,1,2", help="SSL / random-init seeds")
    ap.add_argument("--split-seeds", default="0,1,2", help="probe patient-split seeds")
    ap.add_argument("--config", default="synthetic_cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--parallel", type=int, default=1, help="SSL runs at a time")
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
        }
        for kind, weights in (("ssl", str(run_dir / WEIGHTS_FILE)), ("random", "random")):
            cfg = EncodeConfig(
                encoder=ENCODER, weights=weights, batch_size=64, num_workers=0, qc=False
            )
            feat_dir = a.out / "features" / f"{kind}_seed{seed}"
            res = run_encode(held_out, cfg, feat_dir, seed=seed, progress=False)
            failed = [r for r in res if r.status == "failed"]
            if failed:
                raise RuntimeError(
                    f"encode-slides failed on {failed[0].slide_id}: {failed[0].error}"
                )
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
        "ssl_runs": runs,
        "quick": a.quick,
    }
    (a.out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    pd.set_option("display.width", 120)
    np.set_printoptions(precision=3)
    main()
