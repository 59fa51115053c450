"""Does masked-feature-modeling pretraining teach the slide encoder spatial structure?

For each seed: pretrain a slide encoder on the cohort's feature files (self-supervised, no
labels), embed every slide with it, with the same architecture at random weights, and by
mean-pooling the tile features; then a logistic-regression probe (C chosen on validation,
patient-grouped stratified K-fold) predicts a label from each embedding. Prints JSON:
balanced accuracy mean ± sd over seeds (each seed's value is the mean over its folds).

    # real run on the synthetic cohort (slidefm synth-cohort → slidefm encode-slides):
    python examples/pretrain_spatial_probe.py --features FEATS --manifest manifest.csv \
        --label biomarker_spatial --out outputs/spatial_probe --seeds 0,1,2,3,4
    # self-contained check on a toy random-feature cohort with a planted spatial label:
    python examples/pretrain_spatial_probe.py --toy 48 --out outputs/spatial_probe_toy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.eval.embed import embed_dataset
from slidefm.eval.metrics import balanced_accuracy
from slidefm.eval.probes import linear_probe
from slidefm.eval.splits import make_cv_splits
from slidefm.io.bags import FeatureBagDataset
from slidefm.io.features import SlideFeatures, write_features
from slidefm.io.manifest import read_manifest
from slidefm.models.slide_encoder import SlideEncoder
from slidefm.runtime import seed_everything
from slidefm.train.pretrain import run_pretrain

METHODS = ("pretrained", "random_weights", "mean_pool")


def make_toy_cohort(out: Path, n_slides: int, dim: int = 32, side: int = 20, seed: int = 0):
    """Random-feature slides whose label depends only on layout.

    Every slide has one disc of "tumour" tiles and one disc of "immune" tiles of fixed radii on a
    ``side × side`` grid of "stroma"; label 1 when the discs touch, 0 when they are far apart.
    Tile features = type centroid + noise, so per-slide tile-type counts (and hence mean-pooled
    features) carry no label information beyond noise. Returns the manifest path.
    """
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(3, dim)).astype(np.float32)  # stroma, tumour, immune
    c, r = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = np.stack([c.ravel(), r.ravel()], 1).astype(np.int32)
    feats_dir = out / "features"
    rows = []
    for i in range(n_slides):
        label = i % 2
        dist = 5.0 if label else 11.0  # radii 3 + 2: touching at 5, far apart at 11
        while True:  # both discs wholly inside the slide, so counts do not depend on label
            t_center = rng.uniform(3, side - 4, size=2)
            ang = rng.uniform(0, 2 * np.pi)
            i_center = t_center + dist * np.array([np.cos(ang), np.sin(ang)])
            if (i_center >= 2).all() and (i_center <= side - 3).all():
                break
        kinds = np.zeros(len(grid), int)
        kinds[np.linalg.norm(grid - t_center, axis=1) <= 3.0] = 1
        kinds[np.linalg.norm(grid - i_center, axis=1) <= 2.0] = 2
        feats = centroids[kinds] + 0.7 * rng.normal(size=(len(grid), dim)).astype(np.float32)
        sid = f"toy{i:03d}"
        write_features(
            feats_dir / f"{sid}.h5",
            SlideFeatures(
                sid,
                feats.astype(np.float32),
                grid.astype(np.int64) * 256,
                grid,
                np.ones(len(grid), np.float32),
                dict(
                    encoder="toy",
                    encoder_weights="random",
                    target_mpp=0.5,
                    patch_size=256,
                    patch_size_level0=256,
                    config_hash="toy",
                    seed=seed,
                ),
            ),
        )
        rows.append({"slide_id": sid, "case_id": sid, "biomarker_spatial": label})
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return feats_dir, manifest


def probe_seed(x: np.ndarray, y: np.ndarray, df: pd.DataFrame, label: str, folds: int, seed: int):
    """Mean balanced accuracy over the patient-grouped folds of one seed."""
    splits = make_cv_splits(df, label, n_folds=folds, seeds=[seed])
    pos = {s: i for i, s in enumerate(df["slide_id"])}
    scores = []
    for _, sp in splits.groupby("fold"):
        part = {k: np.array([pos[s] for s in g["slide_id"]]) for k, g in sp.groupby("split")}
        tr, va, te = part["train"], part["val"], part["test"]
        res = linear_probe(x[tr], y[tr], x[va], y[va], x[te], int(y.max()) + 1, seed=seed)
        scores.append(balanced_accuracy(y[te], res.proba.argmax(1)))
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", help="folder of <slide_id>.h5 tile-feature files")
    ap.add_argument("--manifest", help="CSV with slide_id, case_id and the label column")
    ap.add_argument("--label", default="biomarker_spatial")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="synthetic", help="pretrain config (configs/pretrain/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--toy", type=int, default=0, help="generate a toy cohort of N slides")
    ap.add_argument(
        "--pretrain-split",
        default=None,
        help="pretrain only on this manifest split (default: every slide, labels never used)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.toy:
        features, manifest = make_toy_cohort(out / "toy", args.toy)
    elif args.features and args.manifest:
        features, manifest = Path(args.features), args.manifest
    else:
        ap.error("give --features and --manifest, or --toy N")
    df = read_manifest(manifest, required=("slide_id", args.label)).reset_index(drop=True)
    y = pd.factorize(df[args.label].astype(str), sort=True)[0]
    ids = df["slide_id"].tolist()
    plain = FeatureBagDataset(features, slide_ids=ids)
    mean_pool = np.stack([plain.slide(i).features.mean(0) for i in range(len(plain))])
    per_seed: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in [int(s) for s in args.seeds.split(",")]:
        # Pretraining never sees a label; by default it sees every slide's features.
        info = run_pretrain(
            args.config, features, out / f"pretrain_seed{seed}", args.overrides, seed,
            manifest=str(manifest), split=args.pretrain_split,
        )  # fmt: skip
        enc = SlideEncoder.from_checkpoint(info["encoder_checkpoint"])
        _, z_pre = embed_dataset(enc, plain)
        seed_everything(seed)
        cfg = info["config"]
        kw = dict(cfg["encoder_overrides"])
        if cfg["match_input_dim"]:
            kw["input_dim"] = enc.config.input_dim
        rand = SlideEncoder.from_config(cfg["encoder"], **kw)
        rand.set_input_stats(enc.input_mean, enc.input_std)  # same input standardisation
        _, z_rand = embed_dataset(rand, plain)
        for name, x in (
            ("pretrained", z_pre),
            ("random_weights", z_rand),
            ("mean_pool", mean_pool),
        ):
            per_seed[name].append(probe_seed(x, y, df, args.label, args.folds, seed))
        print(
            json.dumps({"seed": seed, **{m: v[-1] for m, v in per_seed.items()}}), file=sys.stderr
        )
    result = {
        "label": args.label,
        "n_slides": len(ids),
        "pretrain_config": args.config,
        "overrides": args.overrides,
        "folds": args.folds,
        "pretrain_slides": args.pretrain_split or "all (unlabelled)",
        "seeds": [int(s) for s in args.seeds.split(",")],
        "metric": "balanced_accuracy (mean over folds per seed; mean ± sd over seeds)",
        **{
            m: {
                "mean": float(np.mean(v)),
                "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "per_seed": v,
            }
            for m, v in per_seed.items()
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
