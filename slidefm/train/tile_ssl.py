"""``slidefm pretrain-tiles`` (CLI: ``pipelines/pretrain_tiles.py``): DINOv2-style
self-supervised training (or domain adaptation) of a tile encoder straight from whole-slide images, with online patching (nothing on disk).

Outputs in ``--out``: ``checkpoints/step_*.pt`` (exact resume, sampler position included:
re-run the same command), ``metrics.csv`` + ``loss_curve.png`` (losses, lr, RankMe / ODCorr of
the teacher on a fixed held-out tile set, kNN-20 where tile labels are given),
``run_config.json``, and the final ``tile_encoder.safetensors`` (the teacher trunk, timm keys)
with ``tile_encoder.json``, loadable by ``slidefm encode-slides --encoder NAME --weights
DIR/tile_encoder.safetensors``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from slidefm.config import config_hash
from slidefm.encoders.registry import (
    build_model,
    get_spec,
    load_weights,
    resolve_weights,
    sha256_file,
)
from slidefm.encoders.ssl import DINOModel, SSLConfig
from slidefm.encoders.ssl_augment import MultiCrop, MultiCropConfig
from slidefm.encoders.tile import preprocess_tiles
from slidefm.eval.metrics import balanced_accuracy
from slidefm.eval.probes import knn_probe
from slidefm.eval.rankme import odcorr, rankme
from slidefm.io.atomic import atomic_path
from slidefm.runtime import dist_info, seed_everything
from slidefm.train.data import make_loader
from slidefm.train.loop import TrainConfig
from slidefm.train.run_dir import (
    RUN_CONFIG,
    TRAIN_OUTPUTS,
    claim_run_dir,
    config_record,
    fit_run,
    inputs_hash,
    load_run_config,
    run_identity,
    train_config,
    write_json,
)
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.online import OnlinePatchConfig, OnlinePatchDataset, SlideTissue, prepare_slides
from slidefm.wsi.patches import read_patch
from slidefm.wsi.reader import SlideReader

log = logging.getLogger(__name__)
WEIGHTS_FILE = "tile_encoder.safetensors"
INFO_FILE = "tile_encoder.json"


@dataclasses.dataclass(frozen=True)
class TileDataConfig:
    batch_size: int = 32  # patches per micro-batch per rank
    num_workers: int = 2


@dataclasses.dataclass(frozen=True)
class TileEvalConfig:
    """The fixed held-out tiles the teacher is scored on during training."""

    n_tiles: int = 512  # unlabelled online patches (own random stream) for RankMe / ODCorr
    labels: str | None = (
        None  # CSV slide_id, x, y, <label_column> (level-0 top-left), e.g. cells.csv
    )
    label_column: str = "cell_type"
    label_tile_px: int = 256  # level-0 side of a labelled tile
    max_labelled: int = 600
    knn_k: int = 20


@dataclasses.dataclass(frozen=True)
class PretrainTilesConfig:
    patches: OnlinePatchConfig = dataclasses.field(default_factory=OnlinePatchConfig)
    crops: MultiCropConfig = dataclasses.field(default_factory=MultiCropConfig)
    ssl: SSLConfig = dataclasses.field(default_factory=SSLConfig)
    data: TileDataConfig = dataclasses.field(default_factory=TileDataConfig)
    eval: TileEvalConfig = dataclasses.field(default_factory=TileEvalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def build_trunk(encoder: str, weights: str) -> tuple[torch.nn.Module, str]:
    """The registry entry's timm trunk with ``weights`` (random | hub | PATH) and its id."""
    spec = get_spec(encoder)
    resolved = resolve_weights(spec, weights)
    trunk = build_model(spec)
    if resolved.is_random:
        log.warning("pretrain-tiles starts %s from RANDOM init", encoder)
    else:
        load_weights(trunk, resolved.path, encoder)
    return trunk, resolved.weights_id


# -- held-out tiles ---------------------------------------------------------------------------
def labelled_tiles(
    slides: list[SlideTissue], ecfg: TileEvalConfig, input_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(tiles (n, S, S, 3) uint8, labels (n,) int, slide index (n,), class names) of up to
    ``max_labelled`` rows of ``ecfg.labels`` on the usable slides (a seeded sample)."""
    df = pd.read_csv(ecfg.labels)
    need = {"slide_id", "x", "y", ecfg.label_column}
    if not need <= set(df.columns):
        raise ValueError(f"{ecfg.labels}: needs columns {sorted(need)}")
    pos = {s.slide_id: i for i, s in enumerate(slides)}
    df = df[df["slide_id"].astype(str).isin(pos)].reset_index(drop=True)
    if df.empty:
        raise ValueError(f"{ecfg.labels}: no rows on the training slides")
    if len(df) > ecfg.max_labelled:
        df = df.sample(ecfg.max_labelled, random_state=seed).reset_index(drop=True)
    classes = sorted(df[ecfg.label_column].astype(str).unique())
    tiles = np.empty((len(df), input_size, input_size, 3), np.uint8)
    for sid, rows in df.groupby("slide_id"):
        s = slides[pos[str(sid)]]
        with SlideReader(s.path, mpp_override=s.mpp_override) as reader:
            level = reader.best_level_for_mpp(ecfg.label_tile_px * s.level0_mpp / input_size)
            for i, r in rows.iterrows():
                tiles[i] = read_patch(reader, r.x, r.y, ecfg.label_tile_px, level, input_size)
    y = df[ecfg.label_column].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    return tiles, y, df["slide_id"].map(pos).to_numpy(), classes


def make_eval_fn(
    slides: list[SlideTissue],
    pcfg: OnlinePatchConfig,
    ecfg: TileEvalConfig,
    spec: Any,
    seed: int,
):
    """eval_fn(model) → RankMe / ODCorr of teacher embeddings of ``n_tiles`` fixed online
    patches (random stream 1, never a training draw) and, with labels, kNN balanced accuracy
    (tiles of half the slides vote for the other half's)."""
    ds = OnlinePatchDataset(slides, pcfg, seed, stream=1, length=ecfg.n_tiles)
    unl = np.stack([ds[i] for i in range(len(ds))])
    ds.close()
    sets = {"": preprocess_tiles(unl, spec)}
    knn = None
    if ecfg.labels:
        tiles, y, slide_of, _ = labelled_tiles(slides, ecfg, spec.input_size, seed)
        sets["lab"] = preprocess_tiles(tiles, spec)
        half = np.random.default_rng(seed).permutation(len(slides))[: max(1, len(slides) // 2)]
        train = np.isin(slide_of, half)
        knn = (y, train)

    def embed(model: DINOModel, x: torch.Tensor) -> np.ndarray:
        dev = next(model.parameters()).device
        out = [
            model.teacher_embed(x[i : i + 128].to(dev)).float().cpu() for i in range(0, len(x), 128)
        ]
        return torch.cat(out).numpy()

    def eval_fn(model: DINOModel) -> dict[str, float]:
        z = embed(model, sets[""])
        out = {"rankme": rankme(z), "odcorr": odcorr(z)}
        if knn is not None:
            y, tr = knn
            zl = embed(model, sets["lab"])
            if tr.any() and (~tr).any():
                c = int(y.max()) + 1
                proba = knn_probe(zl[tr], y[tr], zl[~tr], c, k=ecfg.knn_k)
                out[f"knn{ecfg.knn_k}_bacc"] = balanced_accuracy(y[~tr], proba.argmax(1))
        return out

    return eval_fn


# -- output ----------------------------------------------------------------------------------
def save_tile_encoder(out: Path, model: DINOModel, meta: dict[str, Any]) -> dict[str, Any]:
    """Teacher trunk → ``tile_encoder.safetensors`` (timm keys, strict-loadable into the
    registry architecture) + ``tile_encoder.json`` with its sha256 and provenance."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.teacher.state_dict().items()}
    path = out / WEIGHTS_FILE
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "encoder": meta["registry_name"]})
    info = {**meta, "weights_file": WEIGHTS_FILE, "sha256": sha256_file(path)}
    write_json(out / INFO_FILE, info)
    return info


def tile_encoder_meta(
    encoder: str, spec: Any, seed: int, steps: int, weights_id: str, run_hash: str
) -> dict[str, Any]:
    """What ``tile_encoder.json`` records: the registry architecture (so the weights load
    strictly into it), the training run and the weights it started from."""
    return {
        "registry_name": encoder,
        "arch": spec.arch,
        "timm_kwargs": spec.timm_kwargs,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "pooling": spec.pooling,
        "embed_dim": spec.embed_dim,
        "seed": seed,
        "steps": steps,
        "source_weights": weights_id,
        "config_hash": run_hash,
        "trained_by": "slidefm pretrain-tiles (DINO + iBOT + KoLeo, EMA teacher exported)",
    }


def run_pretrain_tiles(
    jobs: list[SlideJob],
    encoder: str,
    weights: str,
    out: str | Path,
    config: str | None = None,
    overrides: list[str] | None = None,
    seed: int = 0,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train and write the outputs listed in the module docstring; returns run info.

    ``out`` belongs to one (config, weights, slides, seed): another run there is refused
    unless ``overwrite`` (see ``train.run_dir.claim_run_dir``)."""
    out = Path(out)
    cfg = load_run_config(PretrainTilesConfig, config, overrides, "pretrain_tiles")
    pcfg, ccfg, scfg, dcfg, ecfg = cfg.patches, cfg.crops, cfg.ssl, cfg.data, cfg.eval
    tcfg = train_config(cfg.train, out, seed)
    cfgd = config_record(cfg)
    spec = get_spec(encoder)
    slides, skipped = prepare_slides(jobs, pcfg)
    for sid, why in skipped:
        print(f"skipped slide {sid}: {why}", file=sys.stderr)
    seed_everything(seed)
    trunk, weights_id = build_trunk(encoder, weights)
    run_hash = config_hash({**cfgd, "encoder": encoder, "weights": weights_id})
    info: dict[str, Any] = {
        "config": cfgd,
        "config_name": config,
        "config_hash": run_hash,
        "seed": seed,
        "encoder": encoder,
        "source_weights": weights_id,
        "slides": [s.slide_id for s in slides],
        "skipped_slides": [{"slide_id": s, "reason": r} for s, r in skipped],
    }
    identity = run_identity(
        run_hash, inputs_hash([s.path for s in slides], [s.slide_id for s in slides]), seed
    )
    info["identity"] = identity
    rank, _ = dist_info()
    if rank == 0:
        claim_run_dir(out, identity, overwrite, (*TRAIN_OUTPUTS, WEIGHTS_FILE, INFO_FILE))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_CONFIG, info)
    model = DINOModel(trunk, scfg, spec.pooling)
    ds = OnlinePatchDataset(slides, pcfg, seed, transform=MultiCrop(ccfg, spec.mean, spec.std))
    loader = make_loader(
        ds, dcfg.batch_size, seed=seed, num_workers=dcfg.num_workers, drop_last=True
    )
    eval_fn = make_eval_fn(slides, pcfg, ecfg, spec, seed)
    if "step0_eval" not in info and stop_at_step != 0:
        with torch.no_grad():
            info["step0_eval"] = eval_fn(model.eval())  # the loaded model, before any step
        log.info("step 0 (loaded model): %s", info["step0_eval"])
        model.train()
    finished = fit_run(model, loader, tcfg, info, eval_fn, stop_at_step=stop_at_step)
    if rank == 0 and finished:
        meta = tile_encoder_meta(encoder, spec, seed, info["steps"], weights_id, run_hash)
        info["tile_encoder"] = save_tile_encoder(out, model, meta)
        write_json(out / RUN_CONFIG, info)
    return info
