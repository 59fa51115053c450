"""Inference of trained slide-level models: predictions of bags or embeddings, frozen
slide-encoder embedding caches, and the scoring of a manifest by saved MIL checkpoints.

Bags are used whole (every tile) at inference; a frozen encoder's embeddings are computed once
per cohort and shared by every fold and seed of a protocol run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidefm.runtime import no_grad

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from slidefm.eval.targets import Task
    from slidefm.io.bags import Bags, FeatureBagDataset


class EmbeddingDataset:
    """Frozen slide-encoder embeddings (N_slides, E) as training items ``{"embedding", "label"}``
    (rows ``index`` of ``z`` with targets ``y[index]``)."""

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return torch.utils.data.default_collate(items)

    def __init__(self, z: np.ndarray, index: np.ndarray, y: np.ndarray):
        self.z, self.index, self.y = z, np.asarray(index), np.asarray(y)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        j = int(self.index[i])
        return {"embedding": torch.from_numpy(self.z[j]), "label": torch.as_tensor(self.y[j])}


def forward_batch(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model on a bag batch, or on precomputed embeddings (frozen slide encoder)."""
    from slidefm.models.published.bag import position_inputs

    if "embedding" in batch:
        return model(None, embedding=batch["embedding"])
    extra = position_inputs(model, batch)
    return model(batch["features"], batch["grid"], batch["padding_mask"], **extra)


def _loader(dataset: Any, batch_size: int):
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate
    )


@no_grad
def predict_bags(
    model: torch.nn.Module,
    dataset: FeatureBagDataset | EmbeddingDataset,
    batch_size: int,
    device: torch.device,
    multilabel: bool,
    raw: bool = False,
) -> np.ndarray:
    """(len(dataset), C) float64 probabilities (``raw``: logits) of ``model`` in eval mode."""
    import torch

    from slidefm.models.mil import probabilities
    from slidefm.train.loop import to_device

    model.eval()
    out = []
    for b in _loader(dataset, batch_size):
        z = forward_batch(model, to_device(b, device))["logits"]
        out.append((z.float() if raw else probabilities(z, multilabel)).cpu())
    return torch.cat(out).numpy().astype(np.float64)


@no_grad
def frozen_embeddings(
    model: torch.nn.Module, bags: Bags, key: str, batch_size: int, device: torch.device
) -> np.ndarray:
    """(N_slides, E) embeddings of every whole bag by ``model.encoder``, computed once per run
    (cached on ``bags.embeddings[key]``) and shared by all folds and seeds."""
    import torch

    from slidefm.io.bags import bag_rows
    from slidefm.models.published.bag import position_inputs
    from slidefm.train.loop import to_device

    if key not in bags.embeddings:
        model = model.to(device).eval()
        n = len(bags.paths)
        z = []
        for b in _loader(bag_rows(bags, np.arange(n), np.zeros(n, np.int64)), batch_size):
            b = to_device(b, device)
            pos = position_inputs(model.encoder, b)
            z.append(
                model.encoder(b["features"], b["grid"], b["padding_mask"], **pos).float().cpu()
            )
        bags.embeddings[key] = torch.cat(z).numpy()
    return bags.embeddings[key]


def align_embeddings(df: pd.DataFrame, slide_ids: list[str], emb: np.ndarray) -> np.ndarray:
    """Rows of ``emb`` (N, E) in manifest order (float64); a manifest slide without an
    embedding is an error."""
    from slidefm.io.manifest import ManifestError

    pos = {str(s): i for i, s in enumerate(slide_ids)}
    missing = [s for s in df["slide_id"].astype(str) if s not in pos]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ManifestError(
            f"{len(missing)} manifest slide(s) have no embedding: {', '.join(missing[:5])}{more}; run `slidefm embed-slides` on them or drop them"
        )
    return np.asarray(emb, dtype=np.float64)[[pos[s] for s in df["slide_id"].astype(str)]]


def seen_in_training(df: pd.DataFrame, metas: list[dict[str, Any]]) -> np.ndarray:
    """[N] bool: rows whose slide or patient any of the models trained (or early-stopped) on;
    checkpoints written before this was recorded know none."""
    import pandas as pd

    slides = {s for m in metas for s in m.get("train_slide_ids", [])}
    cases = {c for m in metas for c in m.get("train_case_ids", [])}
    ids = df["slide_id"].astype(str)
    case = df["case_id"].astype(str) if "case_id" in df else pd.Series([None] * len(df))
    return (ids.isin(slides) | case.isin(cases)).to_numpy()


def load_fold_models(checkpoint: str | Path) -> tuple[list[Path], list[tuple[Any, dict]], Task]:
    """The classifier(s) of a fold ``model.pt`` or of every fold of a ``mil train`` folder →
    (files, [(model, meta)], their one task)."""
    from slidefm.eval.targets import Task
    from slidefm.models.mil import load_mil_checkpoint

    ckpt = Path(checkpoint)
    files = sorted(ckpt.glob("seed*/fold*/model.pt")) if ckpt.is_dir() else [ckpt]
    if not files:
        raise FileNotFoundError(
            f"No model.pt under {ckpt}; pass a fold checkpoint or a `mil train` output folder"
        )
    models = [load_mil_checkpoint(f) for f in files]
    if models[0][1].get("survival"):
        raise ValueError(
            f"{ckpt} holds survival models: `mil predict` scores classifiers only; out-of-fold risks are in its patient_predictions.csv"
        )
    task = Task.from_dict(models[0][1]["task"])
    if any(Task.from_dict(m["task"]) != task for _, m in models):
        raise ValueError(f"Checkpoints under {ckpt} predict different tasks; pass one checkpoint")
    return files, models, task


def predict_manifest(
    checkpoint: str | Path,
    manifest: str | Path,
    features: str | Path,
    device: str = "auto",
    patient_level: bool = False,
    progress: bool = True,
) -> tuple[pd.DataFrame, Task, list[Path], bool]:
    """Probabilities of the manifest's slides (mean over the fold models) → (table with
    slide_id, case_id, targets when the manifest has the label, prob_*, pred,
    seen_in_training; task; checkpoint files; has_label). ``patient_level`` averages per
    case_id."""
    import pandas as pd

    from slidefm.eval.targets import (
        aggregate_patients,
        check_feature_files,
        encode_targets,
        target_frame,
    )
    from slidefm.io.bags import bag_rows, load_bags
    from slidefm.io.features import check_encoder_matches
    from slidefm.io.manifest import read_manifest, strip_labels
    from slidefm.runtime import pick_device

    files, models, task = load_fold_models(checkpoint)
    meta0 = models[0][1]
    df = strip_labels(read_manifest(manifest, required=("slide_id",)), task.labels)
    paths = check_feature_files(df, features)
    bags = load_bags(paths, progress=progress)
    if bags.dim != meta0["in_dim"]:
        raise ValueError(
            f"Features are {bags.dim}-d but the model expects {meta0['in_dim']}-d; use features from the encoder it was trained on ({meta0.get('features', {}).get('encoder')})"
        )
    check_encoder_matches(paths[0], bags.attrs, meta0.get("features", {}), files[0])
    has_label = all(c in df for c in task.labels)
    y = encode_targets(df, task) if has_label else np.zeros(len(df), dtype=np.int64)
    seen = seen_in_training(df, [m for _, m in models])
    dev = pick_device(device)
    ds = bag_rows(bags, np.arange(len(df)), y)
    prob = np.mean([predict_bags(m.to(dev), ds, 8, dev, task.multilabel) for m, _ in models], 0)
    ids = {"slide_id": df["slide_id"].astype(str), "case_id": df["case_id"].astype(str)}
    parts = [pd.DataFrame(ids)]
    if has_label:
        parts.append(target_frame(y, task))
    parts.append(pd.DataFrame(prob, columns=task.prob_columns))
    preds = pd.concat(parts, axis=1)
    preds["seen_in_training"] = seen
    if not task.multilabel:
        preds["pred"] = [task.classes[i] for i in prob.argmax(1)]
    if patient_level:
        preds = aggregate_patients(
            preds.assign(seed=0, fold=0).drop(columns=["pred", "seen_in_training"]), task
        ).drop(columns=["seed", "fold"])
        preds["seen_in_training"] = preds["case_id"].isin(set(df["case_id"].astype(str)[seen]))
    return preds, task, files, has_label
