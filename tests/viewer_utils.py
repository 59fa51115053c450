"""Inputs for the viewer tests: a feature file on the bundled slide's real tile grid, a random
MIL checkpoint (project format, flagged ``weights: random``), a random alignment checkpoint and
a manifest with a good, a corrupt and a missing slide."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidefm.encoders.encode_config import EncodeConfig
from slidefm.io.features import SlideFeatures, write_features
from slidefm.models.mil import ABMIL, save_mil_checkpoint
from slidefm.wsi.reader import SlideReader
from slidefm.wsi.tiling import make_tile_grid
from slidefm.wsi.tissue import slide_tissue_mask

DIM = 16


def make_features(slide: Path, out: Path, slide_id: str, seed: int = 0) -> Path:
    """``out/<slide_id>.h5`` with the tiles encode-slides would keep and random features
    (dimension 0 grows left → right, so the slide has spatial structure)."""
    with SlideReader(slide) as r:
        _, mask, scale = slide_tissue_mask(r, EncodeConfig().tissue_config())
        tiles = make_tile_grid(r.info.width, r.info.height, r.mpp, mask, scale, 0.5, 256, 0, 0.1)
        info, mpp = r.info, r.mpp
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(len(tiles.coords), DIM)).astype(np.float32)
    feats[:, 0] = tiles.coords[:, 0] / info.width * 4
    attrs = {
        "encoder": "test_random",
        "encoder_weights": "random",
        "target_mpp": 0.5,
        "patch_size": 256,
        "patch_size_level0": int(tiles.patch_size_level0),
        "extent_level0": float(tiles.extent_level0),
        "level0_mpp": mpp,
        "level0_width": info.width,
        "level0_height": info.height,
        "config_hash": "test",
        "seed": seed,
    }
    sf = SlideFeatures(slide_id, feats, tiles.coords, tiles.grid, tiles.tissue_fraction, attrs)
    return write_features(out / f"{slide_id}.h5", sf)


def make_mil(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = ABMIL(DIM, 2, hidden=16, attn_dim=8, dropout=0.0).eval()
    meta = {
        "model": "abmil",
        "in_dim": DIM,
        "num_classes": 2,
        "model_kwargs": {"hidden": 16, "attn_dim": 8, "dropout": 0.0},
        "task": {"labels": ["label"], "classes": ["neg", "pos"], "multilabel": False},
        "weights": "random",
    }
    return save_mil_checkpoint(out / "mil.pt", model, meta)


def make_align(out: Path, reports: list[str], seed: int = 0) -> Path:
    from slidefm.encoders.text import train_tokenizer
    from slidefm.models.clip import AlignModelConfig, SlideTextModel
    from slidefm.models.slide_encoder import SlideEncoder

    tok = train_tokenizer(reports, 400, out / "tok.model")
    torch.manual_seed(seed)
    text = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "context_length": 24}
    enc = SlideEncoder.from_config("tiny", input_dim=DIM)
    model = SlideTextModel(AlignModelConfig(embed_dim=16, text=text), enc.embed_dim, tok, enc)
    return model.eval().save_checkpoint(out / "align.pt", extra={"slide_encoder_weights": "random"})


REPORTS = [
    "Lung, left upper lobe, lobectomy: invasive adenocarcinoma, acinar pattern, grade 2.",
    "Lung biopsy: small cell carcinoma with extensive necrosis and crush artefact.",
    "Right lower lobe: squamous cell carcinoma, keratinising, margins free.",
    "Soft tissue mass: spindle cell neoplasm with fascicular growth, low mitotic rate.",
]


def make_cohort(sample_slide: Path, root: Path, corpus: list[str]) -> dict[str, Path]:
    """Manifest (good slide ×2 ids, corrupt file, missing file), features, errors.csv,
    checkpoints and a prompt file under ``root``; ``corpus``: texts for the tokenizer."""
    sample_slide = Path(sample_slide).resolve()
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    make_features(sample_slide, feats, "good")
    make_features(sample_slide, feats, "good2", seed=1)
    bad = root / "corrupt.svs"
    bad.write_bytes(b"this is not a slide\n" * 100)
    pd.DataFrame(
        [{"slide_id": "corrupt", "path": str(bad), "status": "failed", "tiles": 0, "seconds": 0.1,
          "error": "SlideReadError: corrupt.svs: cannot open as a slide"}]
    ).to_csv(feats / "errors.csv", index=False)  # fmt: skip
    manifest = root / "manifest.csv"
    pd.DataFrame(
        {
            "slide_id": ["good", "good2", "corrupt", "missing"],
            "case_id": ["c0", "c1", "c2", "c3"],
            "path": [str(sample_slide), str(sample_slide), str(bad), str(root / "nope.svs")],
            "subtype": ["adenocarcinoma", "small_cell", "adenocarcinoma", "spindle_cell"],
            "report": REPORTS,
        }
    ).to_csv(manifest, index=False)
    prompts = root / "prompts.yaml"
    prompts.write_text(
        "name: test\nclasses:\n  adenocarcinoma: [adenocarcinoma]\n  small_cell: [small cell carcinoma]\n"
    )
    return {
        "manifest": manifest,
        "features": feats,
        "mil": make_mil(root),
        "align": make_align(root, list(corpus)),
        "prompts": prompts,
    }


def viewer_args(**kw) -> argparse.Namespace:
    base = dict(
        slide=None, manifest=None, features=None, mil=None, align=None, prompts=None, top_k=3,
        host="127.0.0.1", port=0, cache_mb=64, device="cpu", seed=0,
    )  # fmt: skip
    base.update({k: None if v is None else str(v) for k, v in kw.items()})
    return argparse.Namespace(**base)
