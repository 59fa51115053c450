"""``slidefm zero-shot``: classify slides from text prompts with an alignment checkpoint.

Outputs in ``--out``: ``predictions.csv`` (per-class probabilities and prediction per slide);
with ``--manifest`` and a label column also ``metrics.json`` (balanced accuracy, weighted F1,
macro AUROC with patient-bootstrap 95% CIs) and ``confusion_matrix.png``. Every output records
the checkpoint's sha256, the prompt file and the seed; a checkpoint whose slide encoder had
random weights is flagged as such.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidefm.eval.zero_shot import format_metrics, load_prompts, write_zero_shot_outputs
from slidefm.io.bags import list_feature_files
from slidefm.io.embeddings import read_embeddings
from slidefm.io.manifest import read_manifest
from slidefm.models.clip import SlideTextModel
from slidefm.pipelines.align import slide_embeddings
from slidefm.pipelines.embed import file_sha256
from slidefm.runtime import pick_device, seed_everything

log = logging.getLogger(__name__)


def select_slides(
    manifest: str | None,
    features: str | None,
    embeddings: str | None,
    split: str | None,
    label_column: str | None = None,
) -> tuple[list[str], list[Any] | None, list[str] | None]:
    """(slide ids, labels or None, case ids or None) from the manifest (rows of ``split``)
    or, without one, every slide of the features folder / embedding file."""
    if manifest:
        df = read_manifest(manifest)
        if split:
            if "split" not in df:
                raise ValueError(f"--split {split} given but {manifest} has no 'split' column")
            df = df[df["split"].astype(str) == split]
            if df.empty:
                raise ValueError(f"manifest {manifest} has no rows with split == {split!r}")
        labels = None
        if label_column:
            if label_column not in df:
                raise ValueError(f"manifest has no label column {label_column!r}")
            labels = df[label_column].tolist()
        return df["slide_id"].astype(str).tolist(), labels, df["case_id"].astype(str).tolist()
    if features:
        return [p.stem for p in list_feature_files(features)], None, None
    return read_embeddings(embeddings)[0], None, None


def checkpoint_provenance(path: str | Path, model: SlideTextModel) -> dict[str, Any]:
    extra = getattr(model, "checkpoint_extra", {})
    return {
        "checkpoint": str(Path(path).resolve()),
        "checkpoint_sha256": file_sha256(path),
        "slide_encoder_weights": extra.get("slide_encoder_weights", "unknown"),
    }


def run_zero_shot(
    checkpoint: str | Path,
    prompts: str | Path,
    out: str | Path,
    features: str | None = None,
    embeddings: str | None = None,
    manifest: str | None = None,
    label_column: str | None = None,
    split: str | None = None,
    max_tiles: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Score the slides, write the outputs; returns {metrics, probs, slide_ids, classes}."""
    seed_everything(seed)
    model = SlideTextModel.from_checkpoint(checkpoint).to(pick_device(device))
    ps = load_prompts(prompts)
    ids, labels, cases = select_slides(manifest, features, embeddings, split, label_column)
    prov = {**checkpoint_provenance(checkpoint, model), "prompts_file": str(prompts)}
    if prov["slide_encoder_weights"] == "random":
        log.warning("RANDOM WEIGHTS: this checkpoint's slide encoder was never pretrained")
    emb = slide_embeddings(model, ids, features, embeddings, max_tiles, seed, progress=True)
    probs = model.zero_shot(torch.from_numpy(emb), ps).cpu().numpy().astype(np.float64)
    metrics = write_zero_shot_outputs(
        out, ids, probs, ps, labels=labels, groups=cases, n_boot=n_boot, seed=seed, provenance=prov
    )
    return {"metrics": metrics, "probs": probs, "slide_ids": ids, "classes": ps.classes, **prov}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zero-shot", help="zero-shot slide classification from text prompts")
    p.add_argument(
        "--checkpoint", required=True, help="alignment checkpoint (<align out>/align.pt)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="folder of <slide_id>.h5 tile-feature files")
    src.add_argument(
        "--embeddings", help="slide-embedding H5 (same slide encoder as the checkpoint)"
    )
    p.add_argument(
        "--prompts", required=True, help="prompt YAML (path or name under configs/prompts)"
    )
    p.add_argument("--manifest", help="CSV with slide_id (+ case_id, labels, split)")
    p.add_argument("--label-column", help="manifest column with class names: adds metrics")
    p.add_argument("--split", help="only manifest rows of this split (e.g. test)")
    p.add_argument("--max-tiles", type=int, default=None, help="random tile subset per slide")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed, recorded (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = run_zero_shot(
        args.checkpoint,
        args.prompts,
        args.out,
        features=args.features,
        embeddings=args.embeddings,
        manifest=args.manifest,
        label_column=args.label_column,
        split=args.split,
        max_tiles=args.max_tiles,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
    )
    rnd = " [RANDOM slide encoder]" if res["slide_encoder_weights"] == "random" else ""
    print(f"zero-shot on {len(res['slide_ids'])} slides → {args.out}/predictions.csv{rnd}")
    if res["metrics"]:
        print("  " + format_metrics(res["metrics"]))
    return 0
