"""Inputs of the commands that apply an alignment checkpoint (``zero-shot``, ``retrieve``).

Both read the same things the same way: a seeded ``SlideTextModel`` with its provenance
(checkpoint sha256, whether its slide encoder had random weights), slides as tile-feature files
or a slide-embedding H5, and the manifest rows of one split. Keeping that here means the two
commands cannot drift apart in flags, error messages or what they record.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from slidefm.io.manifest import read_manifest, strip_labels
from slidefm.models.clip import SlideTextModel
from slidefm.pipelines.embed import file_sha256
from slidefm.runtime import pick_device, seed_everything

# Options of ``add_input_args``/``add_run_args`` that ``run_kwargs`` forwards by name to
# run_zero_shot / run_retrieve (--checkpoint and --out are positional there).
RUN_OPTIONS = ("features", "embeddings", "max_tiles", "n_boot", "seed", "device")


def checkpoint_provenance(path: str | Path, model: SlideTextModel) -> dict[str, Any]:
    """What every output records about the checkpoint it came from."""
    extra = getattr(model, "checkpoint_extra", {})
    return {
        "checkpoint": str(Path(path).resolve()),
        "checkpoint_sha256": file_sha256(path),
        "slide_encoder_weights": extra.get("slide_encoder_weights", "unknown"),
    }


def load_model(
    checkpoint: str | Path, device: str, seed: int
) -> tuple[SlideTextModel, dict[str, Any]]:
    """(model on ``device``, provenance), after seeding every RNG with ``seed``."""
    seed_everything(seed)
    model = SlideTextModel.from_checkpoint(checkpoint).to(pick_device(device))
    return model, checkpoint_provenance(checkpoint, model)


def manifest_rows(
    manifest: str | Path, split: str | None, label_column: str | None = None
) -> pd.DataFrame:
    """The manifest's rows of ``split`` (all rows without one), index reset; checks that the
    split and label columns named on the command line exist."""
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


def add_input_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and the slides: ``--features`` DIR or ``--embeddings`` H5."""
    p.add_argument(
        "--checkpoint", required=True, help="alignment checkpoint (<align out>/align.pt)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="folder of <slide_id>.h5 tile-feature files")
    src.add_argument(
        "--embeddings", help="slide-embedding H5 (same slide encoder as the checkpoint)"
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Tile subset, bootstrap, device, output folder and seed (the last options of both)."""
    p.add_argument("--max-tiles", type=int, default=None, help="random tile subset per slide")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed, recorded (default 0)")


def run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``RUN_OPTIONS`` from parsed command-line options."""
    return {name: getattr(args, name) for name in RUN_OPTIONS}
