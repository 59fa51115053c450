"""Classify a cohort's slides from text prompts with an alignment checkpoint (``slidefm
zero-shot``).

Outputs in ``out``: ``predictions.csv`` (per-class probabilities and prediction per slide);
with a manifest and a label column also ``metrics.json`` (balanced accuracy, weighted F1,
macro AUROC with patient-bootstrap 95% CIs) and ``confusion_matrix.png``. Every output records
the checkpoint's sha256, the prompt file and the seed; a checkpoint whose slide encoder had
random weights is flagged as such, and every slide gets an out-of-domain test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from slidefm.eval.checkpoint_inputs import (
    drop_training_patients,
    input_provenance,
    load_model,
    manifest_rows,
    seen_by_checkpoint,
)
from slidefm.eval.embed import slide_embeddings
from slidefm.eval.ood import DEFAULT_ALPHA, DomainReference

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


def domain_columns(model: Any, emb: np.ndarray, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """Out-of-domain test of each slide against the checkpoint's training slides
    (``slidefm.eval.ood``); {} for checkpoints written before it was stored."""
    ref = getattr(model, "checkpoint_extra", {}).get("domain_reference")
    if not ref:
        log.info("this checkpoint has no domain reference: no out-of-domain check")
        return {}
    import torch

    dev = model.logit_scale.device
    with torch.no_grad():
        z = model.encode_slide(embeddings=torch.from_numpy(emb).to(dev)).cpu().numpy()
    sim, p, flag = DomainReference.from_dict(ref).test(z, alpha)
    return {"domain_similarity": sim, "domain_p": p, "out_of_domain": flag}


def domain_summary(flag: np.ndarray, ids: list[str]) -> dict[str, Any]:
    """What the outputs record of the out-of-domain test (``flag`` [N] bool per slide), with
    one warning naming the first out-of-domain slides."""
    if flag.any():
        names = ", ".join(np.asarray(ids)[flag][:5])
        log.warning(
            "OUT OF DOMAIN: %d of %d slide(s) are unlike every slide this model was aligned "
            "on (%s%s; p <= %.2f): their class probabilities are not meaningful, whatever "
            "their value (see out_of_domain in predictions.csv)",
            int(flag.sum()),
            len(ids),
            names,
            ", …" if flag.sum() > 5 else "",
            DEFAULT_ALPHA,
        )
    return {
        "num_out_of_domain": int(flag.sum()),
        "out_of_domain_test": (
            f"kNN similarity to the training slides, conformal p <= {DEFAULT_ALPHA}"
        ),
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
    include_seen: bool = False,
) -> dict[str, Any]:
    """Score the slides, write the outputs; returns {metrics, probs, slide_ids, classes,
    out_of_domain, ...provenance}. Patients the checkpoint was trained on are left out of a
    manifest's rows unless ``include_seen``; every slide gets an out-of-domain test."""
    import torch

    from slidefm.eval.zero_shot import load_prompts, write_zero_shot_outputs

    model, prov = load_model(checkpoint, device, seed)
    ps = load_prompts(prompts)
    prov = {**input_provenance(prov, features, embeddings), "prompts_file": str(prompts)}
    if manifest:
        df, seen = drop_training_patients(
            manifest_rows(manifest, split, label_column), model, include_seen
        )
        ids, cases = df["slide_id"].astype(str).tolist(), df["case_id"].astype(str).tolist()
        labels = df[label_column].tolist() if label_column else None
        prov.update(seen)
    else:
        ids, labels, cases = select_slides(None, features, embeddings, split)
        trained = seen_by_checkpoint(model, ids, None)[0]
        if trained.any():
            log.warning("%d of %d slides were in this checkpoint's training set", trained.sum(),
                        len(ids))  # fmt: skip
        prov["num_training_slides_scored"] = int(trained.sum())
    emb = slide_embeddings(model, ids, features, embeddings, max_tiles, seed, progress=True)
    probs = model.zero_shot(torch.from_numpy(emb), ps).cpu().numpy().astype(np.float64)
    dom = domain_columns(model, emb)
    if dom:
        prov.update(domain_summary(dom["out_of_domain"], ids))
    metrics = write_zero_shot_outputs(
        out,
        ids,
        probs,
        ps,
        labels=labels,
        groups=cases,
        n_boot=n_boot,
        seed=seed,
        provenance=prov,
        extra_columns=dom,
    )
    return {
        "metrics": metrics,
        "probs": probs,
        "slide_ids": ids,
        "classes": ps.classes,
        "out_of_domain": dom.get("out_of_domain"),
        **prov,
    }
