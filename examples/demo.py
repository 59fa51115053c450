"""The README's main job: encode the bundled real slide, offline, and summarise the result.

The tile encoder is a real DINOv2 ViT-S/14 architecture with RANDOM weights (no model hub is
reachable offline); pass --weights PATH (or a populated HF cache with --weights hub) for real
features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from slidefm.cli import main as cli
from slidefm.io.features import read_features

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "CMU-1-Small-Region.svs"


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
        "qc_png": str(feats_dir / "qc" / f"{SAMPLE.stem}.png"),
    }
    print(json.dumps(summary, indent=2))
    if sf.attrs["encoder_weights"] == "random":
        print(
            "NOTE: RANDOM tile-encoder weights: these features demonstrate the pipeline, not a pretrained model."
        )
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--encoder", default="dinov2_vits14")
    a = ap.parse_args()
    sys.exit(run(a.out, a.weights, a.encoder))
