"""Survival analysis end to end on the synthetic cohort, on CPU.

    slidefm synth-cohort (planted proportional-hazards survival, GROUND_TRUTH.md)
      →  slidefm encode-slides (vit_tiny_dev, RANDOM weights)
      →  slidefm pretrain (slide encoder, self-supervised on the same features; no labels)
      →  slidefm mil train --task survival  for slide_encoder (frozen), abmil, mean,
         and the slide encoder again on follow-up shuffled across patients (a control that
         cannot see any planted signal)

The planted log-hazard is 2·biomarker_spatial + 0.3·necrosis_pct: the spatial part is only
visible to a grid-aware model, the necrosis part (a tile count) to any bag model. Prints one
JSON summary: out-of-fold C-index and time-dependent AUC with patient-bootstrap 95% CIs, the
median-split log-rank p, next to the C-index of the true risk (and of each part alone).

    python examples/survival.py --out outputs/survival            # ≥ 300 slides
    python examples/survival.py --out outputs/survival_quick --quick   # tiny smoke run

Measured (300 slides, 156 patients, 116 events, 5 folds, 1 seed; slide encoder pretrained only
1000 steps on a shared 2-core CPU): true-risk C-index 0.753; slide_encoder 0.541 [0.485, 0.595],
abmil 0.510, mean 0.489, shuffled-follow-up control 0.538. That encoder's embeddings separate
biomarker_spatial with linear-probe AUROC only 0.62, so its survival model sees little of the
planted signal; the Cox probe on the slides' true layout counts (immune-tumour contacts,
necrosis %) reaches 0.710 [0.666, 0.753], so the survival protocol recovers what features carry.

Tile features come from a randomly initialised tile encoder: the numbers demonstrate the
pipeline and the planted ground truth, not a pretrained pathology model.
"""

from __future__ import annotations

import argparse
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


def step(argv: list[str]) -> None:
    t = time.time()
    print(f"$ slidefm {' '.join(argv)}", flush=True)
    rc = cli(argv)
    if rc:
        raise SystemExit(f"`slidefm {argv[0]}` failed with exit code {rc}")
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def summarise(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
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


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "survival")
    ap.add_argument("--n-slides", type=int, default=300)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--models", default="slide_encoder,abmil,mean")
    ap.add_argument("--loss", default="cox", choices=("cox", "nll"))
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny slides (configs/synth/tiny), 40 slides, 3 folds, 2 epochs: checks it runs",
    )
    a = ap.parse_args()
    t0 = time.time()
    cohort, feats = a.out / "cohort", a.out / "features"
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
    models = [m for m in a.models.split(",") if m]
    encoder = a.out / "pretrain" / "encoder.pt"
    if "slide_encoder" in models and not encoder.is_file():
        step(
            ["pretrain", "--config", pre_cfg, "--features", str(feats)]
            + ["--out", str(encoder.parent)]
        )  # fmt: skip  (self-supervised: no labels used)
    runs: dict[str, dict] = {}
    plan = [(m, manifest) for m in models]
    control = "slide_encoder" if "slide_encoder" in models else models[0]
    plan.append((f"{control}__shuffled_follow_up", shuffled_manifest(manifest)))
    for name, man in plan:
        model = name.split("__")[0]
        run_dir = a.out / "mil" / f"{name}__{a.loss}"
        argv = ["mil", "train", "--task", "survival", "--manifest", str(man)]
        argv += ["--features", str(feats), "--time", TIME, "--event", EVENT]
        argv += ["--model", model, "--folds", str(folds), "--seeds", a.seeds]
        argv += ["--set", f"survival_loss={a.loss}", "--set", f"n_boot={a.n_boot}"]
        argv += ["--out", str(run_dir), "--no-progress", *train_extra]
        if model == "slide_encoder":
            argv += ["--slide-encoder", str(encoder)]
        step(argv)
        runs[name] = summarise(run_dir)
    summary = {
        "cohort": str(manifest),
        "cohort_kind": "synthetic slides (slidefm synth-cohort) encoded with vit_tiny_dev, RANDOM weights",
        "note": "tile features are not from a pretrained model: this demonstrates the pipeline and the planted ground truth",
        "survival_loss": a.loss,
        "ground_truth_c_index": truth(cohort),
        "metric_format": "[value, 95% CI low, 95% CI high]; value = pooled out-of-fold (patients), mean over seeds; CI = patient bootstrap",
        "runs": runs,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
