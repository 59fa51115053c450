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

from slidefm.pipelines.align import slide_embeddings
from slidefm.pipelines.align_inputs import (
    add_input_args,
    add_run_args,
    load_model,
    manifest_rows,
    run_kwargs,
)
from slidefm.pipelines.align_inputs import (
    checkpoint_provenance as checkpoint_provenance,  # re-exported: it used to live here
)

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
    from slidefm.io.bags import list_feature_files
    from slidefm.io.embeddings import read_embeddings

    if manifest:
        df = manifest_rows(manifest, split, label_column)
        labels = df[label_column].tolist() if label_column else None
        return df["slide_id"].astype(str).tolist(), labels, df["case_id"].astype(str).tolist()
    if features:
        return [p.stem for p in list_feature_files(features)], None, None
    return read_embeddings(embeddings)[0], None, None


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
    import torch

    from slidefm.eval.zero_shot import load_prompts, write_zero_shot_outputs

    model, prov = load_model(checkpoint, device, seed)
    ps = load_prompts(prompts)
    ids, labels, cases = select_slides(manifest, features, embeddings, split, label_column)
    prov = {**prov, "prompts_file": str(prompts)}
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
    add_input_args(p)
    p.add_argument(
        "--prompts", required=True, help="prompt YAML (path or name under configs/prompts)"
    )
    p.add_argument("--manifest", help="CSV with slide_id (+ case_id, labels, split)")
    p.add_argument("--label-column", help="manifest column with class names: adds metrics")
    p.add_argument("--split", help="only manifest rows of this split (e.g. test)")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.eval.zero_shot import format_metrics

    res = run_zero_shot(
        args.checkpoint,
        args.prompts,
        args.out,
        manifest=args.manifest,
        label_column=args.label_column,
        split=args.split,
        **run_kwargs(args),
    )
    rnd = " [RANDOM slide encoder]" if res["slide_encoder_weights"] == "random" else ""
    print(f"zero-shot on {len(res['slide_ids'])} slides → {args.out}/predictions.csv{rnd}")
    if res["metrics"]:
        print("  " + format_metrics(res["metrics"]))
    return 0
