"""Survival analysis end to end on the synthetic cohort, on CPU.

    slidefm synth-cohort (planted proportional-hazards survival, GROUND_TRUTH.md)
      →  slidefm encode-slides (vit_tiny_dev, RANDOM weights)
      →  slidefm pretrain --config synthetic (slide encoder, self-supervised; no labels, no
         follow-up)
      →  slidefm embed-slides → slidefm probe --task survival (Cox model, L2 penalty chosen by
         validation C-index) on the embeddings of: the pretrained slide encoder; the same
         architecture at random weights; mean-pooled tile features; and the pretrained encoder
         again on follow-up shuffled across patients (a control that cannot see any signal)
      →  optionally (--mil) slidefm mil train --task survival for MIL models on the tile bags

The planted log-hazard is 2·biomarker_spatial + 0.3·necrosis_pct: the spatial part is only
visible to a grid-aware model, the necrosis part (a tile count) to any bag model, mean pooling
included. Every probe uses the same patient-grouped folds (stratified by event) for each seed.
Prints one JSON summary: out-of-fold C-index and time-dependent AUC with patient-bootstrap 95%
CIs and the median-split log-rank p, next to the C-index of the true risk (and of each part).

    python examples/survival.py --out outputs/survival                # 560 slides, 3 seeds
    python examples/survival.py --out outputs/survival --mil abmil,mean   # + MIL models
    python examples/survival.py --out outputs/survival_quick --quick  # tiny smoke run

Measured with the default command (2-core CPU; 560 slides, 287 patients, 210 events; 3 seeds ×
5 folds): true-risk C-index 0.745 (biomarker_spatial alone 0.699, necrosis_pct alone 0.597);
Cox probe on the pretrained slide encoder 0.648 [0.616, 0.681] (log-rank p ≈ 1e-11 per seed),
same architecture at random weights 0.484 [0.451, 0.519], mean-pooled tile features 0.495
[0.456, 0.531], shuffled-follow-up control 0.470 [0.435, 0.505]. Pretraining took 437 s; the
stages after encoding 13 CPU-min in all.

Earlier (300 slides, encoder pretrained only 1000 steps, MIL heads, 1 seed): true risk 0.753,
frozen slide encoder 0.541 [0.485, 0.595], ABMIL 0.510, mean 0.489, shuffled control 0.538;
that encoder separated biomarker_spatial with linear-probe AUROC only 0.62, while the full
recipe on 560 slides reaches balanced accuracy 0.939 (README, examples/pretrain_spatial_probe.py).

Tile features come from a randomly initialised tile encoder: the numbers demonstrate the
pipeline and the planted ground truth, not a pretrained pathology model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.cli import main as cli
from slidefm.eval.survival import concordance_index

REPO = Path(__file__).resolve().parent.parent
TIME, EVENT = "survival_months", "survival_event"
CONTROL = "slide_encoder__shuffled_follow_up"


def step(argv: list[str]) -> None:
    t = time.time()
    print(f"$ slidefm {' '.join(argv)}", flush=True)
    rc = cli(argv)
    if rc:
        raise SystemExit(f"`slidefm {argv[0]}` failed with exit code {rc}")
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def summarise(results_json: Path) -> dict:
    res = json.loads(results_json.read_text())
    s = res["summary"]
    tri = lambda m: [round(m[k], 3) for k in ("value", "lo", "hi")]  # noqa: E731
    return {
        "c_index": tri(s["c_index"]),
        **{k: tri(v) for k, v in s.items() if k.startswith("auc@")},
        "c_index_fold_mean_sd": [
            round(s["c_index"]["fold_mean"], 3),
            round(s["c_index"]["fold_sd"], 3),
        ],
        "logrank_p": [float(f"{p['logrank_p']:.3g}") for p in res["per_seed"]],
        "patients": res["n_slides_or_patients"],
        "events": res["n_events"],
    }


def truth(cohort: Path) -> dict:
    """C-index of the true log-hazard and of each of its parts, on the observed follow-up."""
    t = pd.read_csv(cohort / "survival.csv")
    c = lambda r: round(concordance_index(t[TIME], t[EVENT], r), 4)  # noqa: E731
    return {
        "true_risk": c(t["log_hazard"]),
        "biomarker_spatial_alone": c(t["biomarker_spatial"]),
        "necrosis_pct_alone": c(t["necrosis_pct"]),
    }


def shuffled_manifest(manifest: Path, seed: int = 0) -> Path:
    """The manifest with each patient's follow-up given to another patient: no slide shows
    anything about its (new) outcome, so any model must stay near C-index 0.5."""
    df = pd.read_csv(manifest, dtype={"slide_id": str, "case_id": str})
    cases = df.drop_duplicates("case_id")[["case_id", TIME, EVENT]].reset_index(drop=True)
    perm = np.random.default_rng(seed).permutation(len(cases))
    new = cases[[TIME, EVENT]].iloc[perm].set_axis(cases["case_id"])
    df[TIME], df[EVENT] = df["case_id"].map(new[TIME]), df["case_id"].map(new[EVENT])
    out = manifest.with_name("manifest_shuffled_follow_up.csv")
    df.to_csv(out, index=False)
    return out


def baseline_embeddings(feats: Path, encoder: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """The two comparison embeddings, written as ``embed-slides`` files: the pretrained
    encoder's architecture at random weights (same input standardisation), and the mean of each
    slide's tile features (sees tile-type shares such as necrosis %, not the layout)."""
    from slidefm.eval.embed import embed_dataset
    from slidefm.io.bags import FeatureBagDataset
    from slidefm.io.embeddings import write_embeddings
    from slidefm.models.slide_encoder import SlideEncoder
    from slidefm.runtime import seed_everything

    bags = FeatureBagDataset(feats)
    pre = SlideEncoder.from_checkpoint(encoder)
    seed_everything(seed)
    rand = SlideEncoder(pre.config)
    rand.set_input_stats(pre.input_mean, pre.input_std)
    ids, z = embed_dataset(rand, bags)
    paths = {"slide_encoder_random_weights": out / "slide_encoder_random_weights.h5",
             "mean_pool": out / "mean_pool.h5"}  # fmt: skip
    cfg = json.dumps(dataclasses.asdict(pre.config), default=str)
    write_embeddings(paths["slide_encoder_random_weights"], ids, z,
                     {"checkpoint_sha256": "random", "seed": seed, "encoder_config": cfg})  # fmt: skip
    mean = np.stack([bags.slide(i).features.mean(0) for i in range(len(bags))])
    write_embeddings(paths["mean_pool"], [bags.slide(i).slide_id for i in range(len(bags))],
                     mean, {"checkpoint_sha256": "none: mean of tile features", "seed": seed,
                            "encoder_config": "mean_pool"})  # fmt: skip
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "survival")
    ap.add_argument("--n-slides", type=int, default=560)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2", help="CV split seeds (pretraining: seed 0)")
    ap.add_argument("--mil", default="", help="also `mil train --task survival` these models, "
                    "e.g. abmil,mean,slide_encoder (1 seed each; slow)")  # fmt: skip
    ap.add_argument("--loss", default="cox", choices=("cox", "nll"), help="MIL survival loss")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny slides (configs/synth/tiny), 40 slides, 3 folds, short runs: checks it runs",
    )
    a = ap.parse_args()
    t0 = time.time()
    cohort, feats, emb = a.out / "cohort", a.out / "features", a.out / "embeddings"
    manifest = cohort / "manifest.csv"
    n_slides, folds, synth_cfg, pre_cfg = a.n_slides, a.folds, "default", "synthetic"
    train_extra, encode_extra = [], []
    if a.quick:
        n_slides, folds, synth_cfg, pre_cfg = 40, 3, "tiny", "tiny"
        train_extra = ["--epochs", "2", "--set", "head_epochs=5"]
        # A tiny slide (192 µm square) is smaller than the default 50,000 µm² speck size.
        encode_extra = ["--set", "tissue.min_object_um2=1000"]
    if not manifest.is_file() or TIME not in pd.read_csv(manifest, nrows=1):
        step(["synth-cohort", "--out", str(cohort), "--n-slides", str(n_slides)]
             + ["--config", synth_cfg, "--seed", "0", "--no-progress"])  # fmt: skip
    step(["encode-slides", "--manifest", str(manifest), "--out", str(feats)]
         + ["--encoder", "vit_tiny_dev", "--weights", "random", "--no-qc", "--no-progress"]
         + encode_extra)  # fmt: skip
    encoder = a.out / "pretrain" / "encoder.pt"
    if not encoder.is_file():  # self-supervised on every slide's features: no labels used
        step(["pretrain", "--config", pre_cfg, "--features", str(feats)]
             + ["--out", str(encoder.parent), "--seed", "0"])  # fmt: skip
    emb.mkdir(parents=True, exist_ok=True)
    embeddings = {"slide_encoder": emb / "slide_encoder.h5"}
    step(["embed-slides", "--checkpoint", str(encoder), "--features", str(feats)]
         + ["--out", str(embeddings["slide_encoder"]), "--manifest", str(manifest)])  # fmt: skip
    embeddings |= baseline_embeddings(feats, encoder, emb)
    shuffled = shuffled_manifest(manifest)
    plan = [(name, path, manifest) for name, path in embeddings.items()]
    plan.append((CONTROL, embeddings["slide_encoder"], shuffled))
    runs: dict[str, dict] = {}
    splits = a.out / "probe" / "slide_encoder" / "splits.csv"
    for name, path, man in plan:
        run_dir = a.out / "probe" / name
        argv = ["probe", "--task", "survival", "--embeddings", str(path), "--manifest", str(man)]
        argv += ["--time", TIME, "--event", EVENT, "--folds", str(folds), "--seeds", a.seeds]
        argv += ["--n-boot", str(a.n_boot), "--out", str(run_dir), "--no-progress"]
        if name != "slide_encoder":  # the same patient folds for every comparison
            argv += ["--splits", str(splits)]
        step(argv)
        runs[name] = summarise(run_dir / "cox_results.json")
    first_seed = a.seeds.split(",")[0]
    for model in [m for m in a.mil.split(",") if m]:
        run_dir = a.out / "mil" / f"{model}__{a.loss}"
        argv = ["mil", "train", "--task", "survival", "--manifest", str(manifest)]
        argv += ["--features", str(feats), "--time", TIME, "--event", EVENT]
        argv += ["--model", model, "--folds", str(folds), "--seeds", first_seed]
        argv += ["--splits", str(splits), "--set", f"survival_loss={a.loss}"]
        argv += ["--set", f"n_boot={a.n_boot}", "--out", str(run_dir), "--no-progress"]
        if model == "slide_encoder":
            argv += ["--slide-encoder", str(encoder)]
        step(argv + train_extra)
        runs[f"mil_{model}"] = summarise(run_dir / "results.json")
    summary = {
        "cohort": str(manifest),
        "cohort_kind": "synthetic slides (slidefm synth-cohort) encoded with vit_tiny_dev, RANDOM weights",
        "note": "tile features are not from a pretrained model: this demonstrates the pipeline and the planted ground truth",
        "ground_truth_c_index": truth(cohort),
        "metric_format": "[value, 95% CI low, 95% CI high]; value = pooled out-of-fold (patients), mean over seeds; CI = patient bootstrap",
        "runs": runs,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
