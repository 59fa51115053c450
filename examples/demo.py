"""The README's main job, offline: encode the bundled real slide, then slides → reports.

1. ``slidefm encode-slides`` on data/sample/CMU-1-Small-Region.svs (tissue, tiles at 0.5 µm/px,
   a DINOv2 ViT-S/14 architecture with RANDOM weights: no model hub is reachable offline; pass
   --weights PATH, or --weights hub with a populated HF cache, for real features). Random
   weights are initialised so features depend on the tile (LayerScale at 1, see
   slidefm.encoders.registry.build_random_model); the summary prints two checks of that.
2. Vision–language on a small synthetic cohort (examples/zero_shot.py and
   examples/report_retrieval.py): synthetic slides → tile features → slide-encoder pretraining →
   slide↔report alignment on the training patients → zero-shot subtyping from text prompts and
   slide→report retrieval on held-out patients, plus the real slide scored by the same model.
   Skip with --no-vl.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from slidefm.cli import main as cli
from slidefm.io.features import read_features

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
SAMPLE = REPO / "data" / "sample" / "CMU-1-Small-Region.svs"


def feature_sanity(feats: np.ndarray, tissue_fraction: np.ndarray) -> dict:
    """What the real slide's features show even with random weights: tiles get different
    features (pairwise cosine well below 1), and the main direction of variation across tiles
    follows how much of each tile is tissue (Spearman ρ of PC1 vs tissue_fraction; the sign of a
    principal component is arbitrary, so |ρ|). With identical features both would be void."""
    from scipy.stats import spearmanr

    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    iu = np.triu_indices(len(f), 1)
    centred = feats - feats.mean(axis=0)
    u, sv, _ = np.linalg.svd(centred, full_matrices=False)
    rho = spearmanr(u[:, 0] * sv[0], tissue_fraction).statistic
    return {
        "tile_cosine_median": round(float(np.median((f @ f.T)[iu])), 3),
        "pc1_vs_tissue_fraction_abs_spearman": round(abs(float(rho)), 3),
    }


def run(out: Path, weights: str, encoder: str) -> int:
    feats_dir = out / "features"
    rc = cli(
        [
            "encode-slides",
            str(SAMPLE),
            "--out",
            str(feats_dir),
            "--config",
            "demo",
            "--encoder",
            encoder,
            "--weights",
            weights,
        ]
    )
    if rc:
        return rc
    sf = read_features(feats_dir / f"{SAMPLE.stem}.h5")
    summary = {
        "slide": SAMPLE.name,
        "tiles": sf.num_tiles,
        "feature_dim": int(sf.features.shape[1]),
        "grid_cols_rows": (sf.grid.max(0) + 1).tolist(),
        "level0_mpp": sf.attrs["level0_mpp"],
        "target_mpp": sf.attrs["target_mpp"],
        "patch_size_level0": sf.attrs["patch_size_level0"],
        "encoder": sf.attrs["encoder"],
        "encoder_weights": sf.attrs["encoder_weights"],
        "feature_norm_mean": round(float(np.linalg.norm(sf.features, axis=1).mean()), 3),
        **feature_sanity(sf.features, sf.tissue_fraction),
        "qc_png": str(feats_dir / "qc" / f"{SAMPLE.stem}.png"),
    }
    print(json.dumps(summary, indent=2))
    if sf.attrs["encoder_weights"] == "random":
        print(
            "NOTE: RANDOM tile-encoder weights: these features demonstrate the pipeline, not a "
            "pretrained model. They still depend on the tile (median cosine < 1) and their main "
            "axis of variation tracks tissue vs glass (|Spearman ρ| of PC1 vs tissue fraction)."
        )
    return 0


def run_vision_language(out: Path, n_slides: int) -> int:
    """Zero-shot subtyping and report retrieval on held-out synthetic patients (minutes, CPU)."""
    import report_retrieval
    import zero_shot

    argv = ["--out", str(out), "--n-slides", str(n_slides), "--no-ablation"]
    argv += ["--pretrain-steps", "600", "--n-boot", "200"]
    print("\n== vision–language: zero-shot subtyping ==", flush=True)
    rc = zero_shot.main(argv)
    if rc:
        return rc
    print("\n== vision–language: slide → report retrieval ==", flush=True)
    return report_retrieval.main(argv)


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the cohort workers)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--encoder", default="dinov2_vits14")
    ap.add_argument("--vl-slides", type=int, default=120, help="synthetic cohort size")
    ap.add_argument("--no-vl", action="store_true", help="stop after encoding the real slide")
    a = ap.parse_args()
    rc = run(a.out, a.weights, a.encoder)
    if not rc and not a.no_vl:
        rc = run_vision_language(a.out / "vl", a.vl_slides)
    print(
        f"\ndemo: {(time.perf_counter() - t0) / 60:.1f} min wall, {cpu_seconds() / 60:.1f} min CPU "
        "(a re-run reuses finished outputs)"
    )
    sys.exit(rc)
