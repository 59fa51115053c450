"""Slide embeddings from tile-feature files with a slide encoder (``slidefm embed-slides``, and
the frozen-encoder embeddings of pretraining, alignment, zero-shot and retrieval).

The encoder comes from a checkpoint (its sha256 is recorded), explicitly from a config with
``weights="random"``, or from the slide-encoder registry (published Prov-GigaPath / TITAN /
CHIEF or slidefm's configs). Random-weight outputs say so on screen and in the file's attrs,
so they can never pass for pretrained embeddings. Published models get each slide's level-0
coords and patch size, and refuse features whose width or recorded tile encoder does not fit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slidefm.config import config_hash
from slidefm.encoders.registry import sha256_file
from slidefm.runtime import autocast, no_grad, pick_device, seed_everything

if TYPE_CHECKING:  # heavy modules load inside the functions
    import torch
    from torch import nn

    from slidefm.io.bags import FeatureBagDataset
    from slidefm.models.clip import SlideTextModel

log = logging.getLogger(__name__)


@no_grad
def embed_dataset(
    encoder: nn.Module,
    dataset: FeatureBagDataset,
    device: torch.device | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[list[str], np.ndarray]:
    """(slide_ids, embeddings [N_slides, E] float32), one slide per forward (no padding).

    The encoder is put in eval mode and restored to its previous mode afterwards.
    """
    from tqdm import tqdm

    from slidefm.models.published.bag import position_inputs

    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    ids, out = [], []
    for i in tqdm(range(len(dataset)), desc="embed", disable=not progress, dynamic_ncols=True):
        item = dataset[i]
        feats = item["features"].unsqueeze(0).to(device)
        grid = item["grid"].unsqueeze(0).to(device)
        pos = position_inputs(encoder, item)  # published encoders: level-0 coords, patch size
        if pos:
            pos["coords"] = pos["coords"][None].to(device)
        with autocast(device, precision):
            z = encoder(feats, grid, None, **pos)
        ids.append(item["slide_id"])
        out.append(z.float().cpu().numpy()[0])
    encoder.train(was_training)
    return ids, np.stack(out) if out else np.zeros((0, 0), np.float32)


def slide_embeddings(
    model: SlideTextModel,
    slide_ids: list[str],
    features: str | Path | None = None,
    embeddings: str | Path | None = None,
    max_tiles: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Slide-encoder embeddings [N, E_slide] of ``slide_ids``: read from an embedding H5, or
    computed from tile-feature files with the model's slide encoder (whole slides)."""
    from slidefm.io.bags import FeatureBagDataset
    from slidefm.io.embeddings import read_embeddings

    if (features is None) == (embeddings is None):
        raise ValueError("give exactly one of --features DIR or --embeddings H5")
    if embeddings is not None:
        ids, emb, _ = read_embeddings(embeddings)
        pos = {s: i for i, s in enumerate(ids)}
        missing = [s for s in slide_ids if s not in pos]
        if missing:
            raise ValueError(
                f"{len(missing)} slide(s) are not in {embeddings}: {', '.join(missing[:5])}"
            )
        return emb[[pos[s] for s in slide_ids]]
    if model.slide_encoder is None:
        raise ValueError(
            "this alignment model was trained on precomputed embeddings; pass --embeddings H5"
        )
    ds = FeatureBagDataset(features, slide_ids=slide_ids, max_tiles=max_tiles, seed=seed)
    _, z = embed_dataset(model.slide_encoder, ds, progress=progress)
    return z


def load_encoder(
    checkpoint: str | None, config: str | None, weights: str | None
) -> tuple[nn.Module, dict]:
    """The encoder and the provenance attrs its embeddings must carry."""
    from slidefm.models.slide_encoder import SlideEncoder

    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        enc = SlideEncoder.from_checkpoint(checkpoint)
        prov = {
            "weights": str(Path(checkpoint).resolve()),
            "checkpoint_sha256": sha256_file(checkpoint),
            "encoder_config": getattr(enc.config, "name", None) or config or Path(checkpoint).stem,
        }
    elif config:
        if weights != "random":
            raise ValueError(
                "--config without --checkpoint builds an untrained encoder: pass --weights random "
                "to confirm (the output is then marked random), or give --checkpoint"
            )
        enc = SlideEncoder.from_config(config)
        prov = {"weights": "random", "checkpoint_sha256": "random", "encoder_config": config}
    else:
        raise ValueError("give --checkpoint CKPT, or --config NAME --weights random")
    prov["encoder_config_hash"] = config_hash(enc.config)
    return enc, prov


def load_registry_encoder(model: str, weights: str | None) -> tuple[nn.Module, dict]:
    """A registry entry with ``weights`` (hub | PATH | random) and its provenance attrs."""
    from slidefm.models.registry import create_slide_encoder

    if weights is None:
        raise ValueError(
            f"--model {model} needs --weights hub (HF cache), --weights PATH, or --weights random"
        )
    enc = create_slide_encoder(model, weights=weights)
    wid = enc.weights_id
    prov = {
        "weights": "random" if wid == "random" else str(weights),
        "checkpoint_sha256": wid.split("@sha256:")[-1] if "@sha256:" in wid else wid,
        "encoder_config": model,
        "slide_encoder": model,
        "slide_encoder_licence": enc.registry_entry.licence,
    }
    arch = dataclasses.asdict(enc.config) if hasattr(enc, "config") else {"model": model}
    prov["encoder_config_hash"] = config_hash(arch)
    return enc, prov


def recorded_tile_encoder(path: str | Path, attrs: dict) -> str | None:
    """The tile encoder a feature file records: its ``encoder`` attr, else TRIDENT's folder
    name ``features_<encoder>``."""
    name = attrs.get("encoder")
    if name:
        return str(name)
    parent = Path(path).parent.name
    return parent.removeprefix("features_") if parent.startswith("features_") else None


def check_published_inputs(entry, path: Path, attrs: dict, dim: int) -> None:
    """Refuse features a published slide encoder was not trained on (one clear line)."""
    expected = (
        f"{entry.name} expects {entry.input_dim}-d {entry.tile_encoder} features of "
        f"{entry.tile_size}-px tiles at {entry.mpp} µm/px"
    )
    if dim != entry.input_dim:
        raise ValueError(f"{path.name}: features are {dim}-d; {expected}")
    recorded = recorded_tile_encoder(path, attrs)
    ok = entry.accepts_tile_encoder(recorded)
    if ok is False:
        raise ValueError(f"{path.name}: features come from tile encoder {recorded!r}; {expected}")
    if ok is None:
        log.warning("%s: no tile encoder recorded; %s", path.name, expected)


@no_grad
def embed_published(
    encoder: nn.Module,
    dataset: FeatureBagDataset,
    device: torch.device,
    precision: str = "fp32",
    max_tiles: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[str], np.ndarray]:
    """(slide_ids, [N_slides, E]) with a published encoder: coords + patch size per slide."""
    import torch
    from tqdm import tqdm

    from slidefm.io.bags import item_rng, subsample

    entry = encoder.registry_entry
    ids, out = [], []
    for i in tqdm(range(len(dataset)), desc="embed", disable=not progress, dynamic_ncols=True):
        sf = dataset.slide(i)
        check_published_inputs(entry, dataset.paths[i], sf.attrs, sf.features.shape[1])
        ps = sf.attrs.get("patch_size_level0")
        if not ps:
            raise ValueError(f"{dataset.paths[i].name}: no patch_size_level0 attr")
        idx = subsample(sf.num_tiles, max_tiles, item_rng(seed, 0, i))
        feats = torch.from_numpy(np.ascontiguousarray(sf.features[idx], np.float32))
        coords = torch.from_numpy(np.ascontiguousarray(sf.coords[idx]))
        with autocast(device, precision):
            z = encoder.embed(feats[None].to(device), coords[None].to(device), float(ps))
        ids.append(sf.slide_id if sf.slide_id else dataset.slide_ids[i])
        out.append(z.float().cpu().numpy()[0])
    return ids, np.stack(out) if out else np.zeros((0, 0), np.float32)


def run_embed(
    features: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    config: str | None = None,
    weights: str | None = None,
    slide_ids: Sequence[str] | None = None,
    max_tiles: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    model: str | None = None,
) -> Path:
    """Embed every slide of ``features`` (or ``slide_ids``) and write ``out`` atomically."""
    from slidefm.io.bags import FeatureBagDataset
    from slidefm.io.embeddings import write_embeddings

    seed_everything(seed)  # random weights (and max_tiles subsets) are reproducible
    if model and (checkpoint or config):
        raise ValueError("give --model NAME --weights W, or --checkpoint / --config, not both")
    if model:
        enc, prov = load_registry_encoder(model, weights)
    else:
        enc, prov = load_encoder(checkpoint, config, weights)
    dev = pick_device(device)
    enc.to(dev)
    ds = FeatureBagDataset(features, slide_ids=slide_ids, max_tiles=max_tiles, seed=seed)
    from slidefm.io.provenance import is_random, random_weight_notes, tile_encoder_info
    from slidefm.models.registry import is_published

    published = is_published(enc)  # published: checked per slide (width, tile encoder)
    if not published and ds.slide(0).features.shape[1] != enc.config.input_dim:
        raise ValueError(
            f"features are {ds.slide(0).features.shape[1]}-d but the encoder expects "
            f"{enc.config.input_dim}-d inputs; use an encoder trained on these tile features"
        )
    tile_info = tile_encoder_info(ds.paths[0])
    info = {**tile_info, "slide_encoder_weights": "random" if is_random(prov["weights"]) else ""}
    for note in random_weight_notes(info):
        log.warning("RANDOM WEIGHTS: %s", note)
    if published:
        enc.eval()
        ids, emb = embed_published(enc, ds, dev, precision, max_tiles, seed, progress)
    else:
        ids, emb = embed_dataset(enc, ds, dev, precision, progress=progress)
    attrs = {
        **prov,
        "seed": seed,
        "features_dir": str(Path(features).resolve()),
        **tile_info,  # tile_encoder, tile_encoder_weights ("random" or name@sha256:…)
        "max_tiles": max_tiles if max_tiles else 0,
        "embed_dim": int(emb.shape[1]),
    }
    path = write_embeddings(out, ids, emb, attrs)
    print(f"wrote {len(ids)} slide embeddings ({emb.shape[1]}-d) to {path}")
    for note in random_weight_notes(info):
        print(f"NOTE: {note}")
    return path
