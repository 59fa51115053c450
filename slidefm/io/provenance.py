"""Which weights produced a result: the one place that reads and words "random weights".

Every output downstream of tile features (pretraining, slide embeddings, alignment, zero-shot,
retrieval and their PNGs) records the weights of both encoders it depends on, under the same
keys, so a number computed on randomly initialised encoders can never pass for a pretrained
result:

- ``tile_encoder`` / ``tile_encoder_weights``: from the feature files' ``encoder`` and
  ``encoder_weights`` attrs (``"random"`` or ``name@sha256:…``);
- ``slide_encoder_weights``: ``"random"``, ``"pretrained"`` or ``"unknown"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

RANDOM = "random"


def is_random(weights: Any) -> bool:
    """True for ``"random"`` (and ``"random:<config>"``-style specs)."""
    return str(weights or "").lower().startswith(RANDOM)


def tile_encoder_info(features: str | Path) -> dict[str, str]:
    """{tile_encoder, tile_encoder_weights} of a feature folder (its first ``.h5``, by name)
    or one feature file; ``"unknown"`` when there is none or it lacks the attrs."""
    from slidefm.io.bags import list_feature_files
    from slidefm.io.features import read_attrs

    p = Path(features)
    files = [p] if p.is_file() else list_feature_files(p) if p.is_dir() else []
    if not files:
        return {"tile_encoder": "unknown", "tile_encoder_weights": "unknown"}
    attrs = read_attrs(files[0])
    return {
        "tile_encoder": str(attrs.get("encoder", "unknown")),
        "tile_encoder_weights": str(attrs.get("encoder_weights", "unknown")),
    }


def random_weight_notes(info: Mapping[str, Any]) -> list[str]:
    """One warning line per randomly initialised encoder recorded in ``info``."""
    notes = []
    if is_random(info.get("tile_encoder_weights")):
        name = info.get("tile_encoder", "tile encoder")
        notes.append(f"tile features come from a RANDOMLY INITIALISED {name} (not pretrained)")
    if is_random(info.get("slide_encoder_weights")):
        notes.append("the slide encoder has RANDOM WEIGHTS (never pretrained)")
    if is_random(info.get("init_weights")):
        notes.append("continued pretraining started from RANDOM WEIGHTS, not the published model")
    return notes


def figure_note(info: Mapping[str, Any]) -> str:
    """Short caption for a PNG ("" when no encoder was random)."""
    parts = []
    if is_random(info.get("tile_encoder_weights")):
        parts.append("tile encoder")
    if is_random(info.get("slide_encoder_weights")):
        parts.append("slide encoder")
    if not parts:
        return ""
    return f"RANDOM WEIGHTS ({' + '.join(parts)}): a pipeline check, not a pretrained model"


def add_figure_note(fig: Any, note: str) -> None:
    """Print ``note`` in red along the bottom of a matplotlib figure (no-op when empty)."""
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, color="tab:red")
