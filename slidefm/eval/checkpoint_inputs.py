"""What the commands that apply an alignment checkpoint (``zero-shot``, ``retrieve``) read, read
one way: a seeded ``SlideTextModel`` with its provenance (checkpoint sha256, whether its slide
encoder had random weights), the provenance of the slides scored now, and the manifest rows
of one split without the patients the checkpoint was trained on. Keeping that here means the
two commands cannot drift apart in error messages or in what they record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidefm.encoders.registry import sha256_file
from slidefm.io.provenance import random_weight_notes, tile_encoder_info
from slidefm.runtime import pick_device, seed_everything

if TYPE_CHECKING:  # heavy modules load inside the functions
    import pandas as pd

    from slidefm.models.clip import SlideTextModel

log = logging.getLogger(__name__)


def checkpoint_provenance(path: str | Path, model: SlideTextModel) -> dict[str, Any]:
    """What every output records about the checkpoint it came from (and the weights of the
    tile encoder whose features it was aligned on)."""
    extra = getattr(model, "checkpoint_extra", {})
    return {
        "checkpoint": str(Path(path).resolve()),
        "checkpoint_sha256": sha256_file(path),
        "slide_encoder_weights": extra.get("slide_encoder_weights", "unknown"),
        "tile_encoder": extra.get("tile_encoder", "unknown"),
        "tile_encoder_weights": extra.get("tile_encoder_weights", "unknown"),
        "selected_step": (extra.get("selected") or {}).get("step"),
    }


def input_provenance(
    prov: dict[str, Any], features: str | None, embeddings: str | None
) -> dict[str, Any]:
    """``prov`` with the tile encoder of the inputs scored now (feature files' attrs, or an
    embedding file's), falling back to the checkpoint's; warns once per random encoder."""
    out = dict(prov)
    if features:
        now = tile_encoder_info(features)
    else:
        from slidefm.io.embeddings import read_embeddings

        attrs = read_embeddings(embeddings)[2] if embeddings else {}
        now = {k: attrs.get(k, "unknown") for k in ("tile_encoder", "tile_encoder_weights")}
    out.update({k: v for k, v in now.items() if v != "unknown"})
    for note in random_weight_notes(out):
        log.warning("RANDOM WEIGHTS: %s", note)
    return out


def seen_by_checkpoint(
    model: SlideTextModel, slide_ids: list[str], case_ids: list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(trained_on [N] bool, selected_on [N] bool): rows whose slide or patient the checkpoint
    was trained on, or chose its step on (validation). Old checkpoints know neither."""
    extra = getattr(model, "checkpoint_extra", {})
    cases = case_ids if case_ids is not None else [None] * len(slide_ids)

    def hits(kind: str) -> np.ndarray:
        sl = set(extra.get(f"{kind}_slide_ids", []))
        ca = set(extra.get(f"{kind}_case_ids", []))
        return np.array([s in sl or c in ca for s, c in zip(slide_ids, cases)], dtype=bool)

    return hits("train"), hits("val")


def drop_training_patients(
    df: pd.DataFrame, model: SlideTextModel, include_seen: bool
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Manifest rows to score: without ``include_seen``, rows of patients the checkpoint was
    trained on are removed (with a warning), so metrics are computed on held-out patients
    only; returns (rows, {num_training_rows_dropped, num_training_rows_scored,
    num_validation_rows, scored_patients})."""
    ids = df["slide_id"].astype(str).tolist()
    cases = df["case_id"].astype(str).tolist() if "case_id" in df else None
    trained, selected = seen_by_checkpoint(model, ids, cases)
    info = {"num_training_rows_dropped": 0, "num_training_rows_scored": 0,
            "num_validation_rows": int(selected.sum())}  # fmt: skip
    if trained.any():
        if include_seen:
            log.warning(
                "LEAKAGE: %d of %d slides belong to patients this checkpoint was trained on; "
                "they are scored (--include-seen), so the metrics overestimate performance",
                int(trained.sum()),
                len(df),
            )
            info["num_training_rows_scored"] = int(trained.sum())
        else:
            if trained.all():
                raise ValueError(
                    f"all {len(df)} slides belong to patients this checkpoint was trained on; "
                    "score held-out patients (e.g. --split test), or pass --include-seen to "
                    "score them anyway (metrics then overestimate performance)"
                )
            log.warning(
                "%d of %d slides belong to patients this checkpoint was trained on: they are "
                "left out, the metrics cover the %d held-out slides (--include-seen keeps them)",
                int(trained.sum()),
                len(df),
                int((~trained).sum()),
            )
            info["num_training_rows_dropped"] = int(trained.sum())
            df = df[~trained].reset_index(drop=True)
            selected = selected[~trained]
    if selected.any():
        log.warning(
            "%d slide(s) belong to validation patients, on which this checkpoint's training "
            "step was selected: slightly optimistic for them; --split test avoids it",
            int(selected.sum()),
        )
    info["scored_patients"] = "held-out" if not info["num_training_rows_scored"] else "mixed"
    return df, info


def load_model(
    checkpoint: str | Path, device: str, seed: int
) -> tuple[SlideTextModel, dict[str, Any]]:
    """(model on ``device``, provenance), after seeding every RNG with ``seed``."""
    from slidefm.models.clip import SlideTextModel

    seed_everything(seed)
    model = SlideTextModel.from_checkpoint(checkpoint).to(pick_device(device))
    return model, checkpoint_provenance(checkpoint, model)


def manifest_rows(
    manifest: str | Path, split: str | None, label_column: str | None = None
) -> pd.DataFrame:
    """The manifest's rows of ``split`` (all rows without one), index reset; checks that the
    split and label columns named on the command line exist."""
    from slidefm.io.manifest import read_manifest, strip_labels

    df = read_manifest(manifest)
    if split:
        if "split" not in df:
            raise ValueError(f"--split {split} given but {manifest} has no 'split' column")
        df = df[df["split"].astype(str) == split].reset_index(drop=True)
        if df.empty:
            raise ValueError(f"manifest {manifest} has no rows with split == {split!r}")
    if label_column and label_column not in df:
        raise ValueError(f"manifest has no label column {label_column!r}")
    return strip_labels(df, [label_column]) if label_column else df
