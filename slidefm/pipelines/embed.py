"""``slidefm embed-slides``: tile-feature files → one slide embedding each, in one HDF5 file.

The encoder comes from a checkpoint (its sha256 is recorded), explicitly from a config with
``--weights random``, or from the slide-encoder registry with ``--model NAME --weights
hub|PATH|random`` (published Prov-GigaPath / TITAN / CHIEF or slidefm's configs). Random-weight
outputs say so on screen and in the file's attrs, so they can never pass for pretrained
embeddings. Published models get each slide's level-0 coords and patch size, and refuse
features whose width or recorded tile encoder does not fit them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from slidefm.config import config_hash
from slidefm.io.bags import FeatureBagDataset, item_rng, subsample
from slidefm.io.embeddings import write_embeddings
from slidefm.io.manifest import read_manifest
from slidefm.runtime import autocast, pick_device, seed_everything

log = logging.getLogger(__name__)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
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
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    ids, out = [], []
    for i in tqdm(range(len(dataset)), desc="embed", disable=not progress, dynamic_ncols=True):
        item = dataset[i]
        feats = item["features"].unsqueeze(0).to(device)
        grid = item["grid"].unsqueeze(0).to(device)
        with autocast(device, precision):
            z = encoder(feats, grid, None)
        ids.append(item["slide_id"])
        out.append(z.float().cpu().numpy()[0])
    encoder.train(was_training)
    return ids, np.stack(out) if out else np.zeros((0, 0), np.float32)


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
            "checkpoint_sha256": file_sha256(checkpoint),
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


@torch.no_grad()
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
    from slidefm.models.registry import is_published

    published = is_published(enc)  # published: checked per slide (width, tile encoder)
    if not published and ds.slide(0).features.shape[1] != enc.config.input_dim:
        raise ValueError(
            f"features are {ds.slide(0).features.shape[1]}-d but the encoder expects "
            f"{enc.config.input_dim}-d inputs; use an encoder trained on these tile features"
        )
    if prov["weights"] == "random":
        log.warning("RANDOM WEIGHTS: these slide embeddings come from an untrained encoder")
    if published:
        enc.eval()
        ids, emb = embed_published(enc, ds, dev, precision, max_tiles, seed, progress)
    else:
        ids, emb = embed_dataset(enc, ds, dev, precision, progress=progress)
    attrs = {
        **prov,
        "seed": seed,
        "features_dir": str(Path(features).resolve()),
        "tile_encoder": str(ds.slide(0).attrs.get("encoder", "unknown")),
        "max_tiles": max_tiles if max_tiles else 0,
        "embed_dim": int(emb.shape[1]),
    }
    path = write_embeddings(out, ids, emb, attrs)
    note = " (RANDOM WEIGHTS, not pretrained)" if prov["weights"] == "random" else ""
    print(f"wrote {len(ids)} slide embeddings ({emb.shape[1]}-d) to {path}{note}")
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed-slides", help="slide embeddings from tile-feature files with a slide encoder"
    )
    p.add_argument("--checkpoint", help="encoder checkpoint (e.g. <pretrain out>/encoder.pt)")
    p.add_argument("--config", help="slide-encoder config name/path, with --weights random")
    p.add_argument(
        "--model",
        help="registry slide encoder (`slidefm slide-encoders list`): gigapath, titan, chief, "
        "or a slidefm config; with --weights",
    )
    p.add_argument(
        "--weights",
        help="with --model: hub | PATH (file or snapshot folder) | random; with --config: random",
    )
    p.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--out", required=True, help="output HDF5, e.g. slide_embeddings.h5")
    p.add_argument("--manifest", help="CSV with slide_id: embed only these slides, in its order")
    p.add_argument("--max-tiles", type=int, default=None, help="random subset per slide")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0, help="seed (random weights, max-tiles subsets)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ids = None
    if args.manifest:
        ids = read_manifest(args.manifest)["slide_id"].astype(str).tolist()
    run_embed(
        args.features,
        args.out,
        checkpoint=args.checkpoint,
        config=args.config,
        weights=args.weights,
        slide_ids=ids,
        max_tiles=args.max_tiles,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        model=args.model,
    )
    return 0
