"""Masked-feature-modeling pretraining of a slide encoder on feature files (``slidefm pretrain``).

Outputs in ``out``: ``checkpoints/step_*.pt`` (exact resume: re-run the same command),
``metrics.csv`` and ``loss_curve.png`` (loss, lr, RankMe of held-out slide embeddings),
``run_config.json`` (resolved config, hash, seed, slides) and the final ``encoder.pt``
(``SlideEncoder.save_checkpoint``) for ``slidefm embed-slides --checkpoint``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from slidefm.config import ConfigError, config_hash
from slidefm.eval.embed import embed_dataset
from slidefm.models.pretrain import PretrainConfig
from slidefm.runtime import dist_info, seed_everything
from slidefm.train.loop import TrainConfig
from slidefm.train.run_dir import config_record, train_config
from slidefm.train.run_dir import load_run_config as load_typed_config

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
    batch_size: int = 8  # slides (crops) per micro-batch per rank
    crop: Any = None  # window side in grid cells, or [min, max]; null = whole slide
    max_tiles: int | None = 1024  # random tile subset per crop
    augment: bool = True  # 90° rotations, flips, feature dropout
    feature_dropout: float = 0.1
    num_workers: int = 0
    cache: bool = True  # keep feature files in memory
    holdout_fraction: float = 0.1  # slides kept out of training for RankMe
    min_holdout: int = 4
    eval_max_tiles: int | None = 4096


@dataclasses.dataclass(frozen=True)
class PretrainRunConfig:
    # name/path under configs/slide_encoder/, or a published registry entry (gigapath, titan):
    # continued pretraining of the published model on one's own cohort.
    encoder: str = "tiny"
    # Published entries only: the starting weights, hub | PATH (published layout) | random.
    encoder_weights: str = ""
    # Fields written over the named encoder config: SlideEncoderConfig's, or the published
    # model's architecture options (a partial mapping: its keys are checked here, the values
    # when the encoder is built).
    encoder_overrides: dict = dataclasses.field(default_factory=dict)
    match_input_dim: bool = False  # set the encoder's input_dim from the feature files
    standardize_inputs: bool = True  # encoder input (x − cohort mean) / std, saved in encoder.pt
    objective: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def published(self) -> bool:
        from slidefm.models.registry import PUBLISHED

        return self.encoder in PUBLISHED

    def __post_init__(self) -> None:
        import inspect

        from slidefm.models.registry import PUBLISHED
        from slidefm.models.slide_encoder import SlideEncoderConfig

        if self.published:
            what = f"{self.encoder} architecture"
            known = set(inspect.signature(PUBLISHED[self.encoder].build).parameters)
            if not self.encoder_weights:
                raise ConfigError(
                    f"encoder_weights: the published slide encoder {self.encoder!r} starts from "
                    "its weights: hub (HF cache), a path in the published layout, or random"
                )
        else:
            what = "SlideEncoderConfig"
            known = {f.name for f in dataclasses.fields(SlideEncoderConfig)}
            if self.encoder_weights:
                raise ConfigError(
                    f"encoder_weights: only published encoders ({', '.join(PUBLISHED)}) take "
                    f"starting weights; slidefm config {self.encoder!r} starts random"
                )
        unknown = sorted(set(self.encoder_overrides) - known)
        if unknown:
            raise ConfigError(
                f"encoder_overrides: Unknown {what} option(s): {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(known))}"
            )


def load_run_config(path: str | None, overrides: list[str] | None) -> PretrainRunConfig:
    """The typed config: YAML < ``overrides`` (``--set``)."""
    return load_typed_config(PretrainRunConfig, path, overrides, "pretrain")


def select_slides(features: str | Path, manifest: str | None, split: str | None) -> list[str]:
    """Slide ids to pretrain on: the feature folder, or the manifest's rows (its ``split``
    column restricted to ``split`` when both exist)."""
    from slidefm.io.bags import list_feature_files
    from slidefm.io.manifest import read_manifest

    if not manifest:
        return [p.stem for p in list_feature_files(features)]
    df = read_manifest(manifest)
    if split and "split" in df:
        df = df[df["split"].astype(str) == split]
        if df.empty:
            raise ValueError(f"manifest {manifest} has no rows with split == {split!r}")
    return df["slide_id"].astype(str).tolist()


def split_holdout(ids: list[str], frac: float, minimum: int, seed: int) -> tuple[list, list]:
    """(train, holdout) with a seeded holdout of max(minimum, frac·n) slides; no holdout
    (RankMe on training slides) when that would leave fewer slides than it holds out."""
    k = max(minimum, round(frac * len(ids)))
    if frac <= 0 or len(ids) - k < k:
        return ids, []
    perm = np.random.default_rng(seed).permutation(len(ids))
    hold = {ids[i] for i in perm[:k]}
    return [s for s in ids if s not in hold], [s for s in ids if s in hold]


def build_encoder(
    cfg: PretrainRunConfig, enc_kw: dict[str, Any], ds: Any, in_dim: int, seed: int
) -> tuple[Any, Any]:
    """(slide encoder of the config, its input statistics (mean, std) over the training
    bags, drawn in a seeded order so a capped sample is fair); the encoder standardises its
    inputs with them when ``standardize_inputs``."""
    from slidefm.models.pretrain import feature_stats
    from slidefm.models.slide_encoder import SlideEncoder

    order = np.random.default_rng(seed).permutation(len(ds))  # a fair sample when capped
    if cfg.published:
        return published_encoder(cfg, enc_kw, ds), feature_stats(
            ds.slide(int(i)).features for i in order
        )
    encoder = SlideEncoder.from_config(cfg.encoder, **enc_kw)
    if encoder.config.input_dim != in_dim:
        raise ValueError(
            f"features are {in_dim}-d but encoder {cfg.encoder!r} expects "
            f"{encoder.config.input_dim}-d; --set encoder_overrides.input_dim={in_dim} "
            "or --set match_input_dim=true"
        )
    stats = feature_stats(ds.slide(int(i)).features for i in order)
    if cfg.standardize_inputs:
        encoder.set_input_stats(*stats)
    return encoder, stats


def published_encoder(cfg: PretrainRunConfig, enc_kw: dict[str, Any], ds: Any) -> Any:
    """The published model with its starting weights, behind the bag interface with a mask
    token. Its inputs are not standardised (it was trained on raw tile features); features it
    was not trained on are refused as in ``embed-slides``."""
    from slidefm.eval.embed import check_published_inputs
    from slidefm.models.published.bag import PublishedBagEncoder
    from slidefm.models.registry import PUBLISHED, create_slide_encoder

    entry = PUBLISHED[cfg.encoder]  # features first: refused before any weight is read
    entry = dataclasses.replace(entry, input_dim=enc_kw.get("input_dim", entry.input_dim))
    first = ds.slide(0)
    check_published_inputs(entry, ds.paths[0], first.attrs, int(first.features.shape[1]))
    published = create_slide_encoder(cfg.encoder, weights=cfg.encoder_weights, **enc_kw)
    if published.weights_id == "random":
        log.warning("RANDOM WEIGHTS: %s starts from random weights (--set encoder_weights)",
                    cfg.encoder)  # fmt: skip
    return PublishedBagEncoder(published, mask_token=True)


def make_eval_fn(features: str | Path, eval_ids: list[str], max_tiles: int | None, seed: int):
    """eval_fn(model) → RankMe and mean per-dim std of the embeddings of ``eval_ids``."""
    from slidefm.eval.rankme import rankme
    from slidefm.io.bags import FeatureBagDataset

    eval_ds = FeatureBagDataset(features, slide_ids=eval_ids, max_tiles=max_tiles, seed=seed)

    def eval_fn(m: Any) -> dict[str, float]:
        _, z = embed_dataset(m.encoder, eval_ds)
        return {"rankme": rankme(z), "embedding_std": float(z.std(axis=0).mean())}

    return eval_fn


def describe_run(
    config: str | None,
    cfgd: dict[str, Any],
    enc_kw: dict[str, Any],
    seed: int,
    features: str | Path,
    ds: Any,
    train_ids: list[str],
    hold_ids: list[str],
) -> dict[str, Any]:
    """The run info (``run_config.json``) with the run's identity: config hash (the encoder
    overrides as applied), feature files of the training and evaluation slides, seed."""
    from slidefm.io.provenance import tile_encoder_info
    from slidefm.train.run_dir import inputs_hash, run_identity

    run_hash = config_hash({**cfgd, "encoder_overrides": enc_kw})
    eval_ids = hold_ids or train_ids
    files = [*ds.paths, *(Path(features) / f"{s}.h5" for s in hold_ids)]
    identity = run_identity(run_hash, inputs_hash(files, [train_ids, eval_ids]), seed)
    return {
        "config": cfgd,
        "config_name": config,
        "config_hash": run_hash,
        "seed": seed,
        "identity": identity,
        "features": str(Path(features).resolve()),
        "num_train_slides": len(train_ids),
        "holdout_slides": hold_ids,
        "rankme_on": "holdout" if hold_ids else "train (too few slides for a holdout)",
        **tile_encoder_info(ds.paths[0]),
        "slide_encoder_weights": "pretrained (this run)",
        **({"init_weights": cfgd.get("encoder_weights")} if cfgd.get("encoder_weights") else {}),
    }


def run_pretrain(
    config: str | None,
    features: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    seed: int = 0,
    manifest: str | None = None,
    split: str | None = "train",
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain and write the outputs listed in the module docstring; returns run info.

    ``out`` belongs to one (config, feature files, seed): another one is refused unless
    ``overwrite`` (see ``train.run_dir.claim_run_dir``)."""
    from slidefm.io.bags import collate_bags
    from slidefm.io.provenance import random_weight_notes, tile_encoder_info
    from slidefm.models.pretrain import MaskedFeatureModel
    from slidefm.train.data import make_loader, training_bags
    from slidefm.train.run_dir import (
        RUN_CONFIG,
        TRAIN_OUTPUTS,
        claim_run_dir,
        fit_run,
        save_final,
        write_json,
    )

    out = Path(out)
    cfg = load_run_config(config, overrides)
    objective, data, tcfg = cfg.objective, cfg.data, train_config(cfg.train, out, seed)
    cfgd = config_record(cfg)
    ids = select_slides(features, manifest, split)
    train_ids, hold_ids = split_holdout(ids, data.holdout_fraction, data.min_holdout, seed)
    ds = training_bags(features, train_ids, data, seed)
    in_dim = int(ds.slide(0).features.shape[1])
    enc_kw = dict(cfg.encoder_overrides)
    if cfg.match_input_dim:
        enc_kw["input_dim"] = in_dim
    eval_ids = hold_ids or train_ids
    info = describe_run(config, cfgd, enc_kw, seed, features, ds, train_ids, hold_ids)
    identity = info["identity"]
    for note in random_weight_notes(info):
        log.warning("RANDOM WEIGHTS: %s", note)
    final = final_output(cfg)
    if dist_info()[0] == 0:
        claim_run_dir(out, identity, overwrite, (*TRAIN_OUTPUTS, final))
    seed_everything(seed)
    encoder, stats = build_encoder(cfg, enc_kw, ds, in_dim, seed)
    model = MaskedFeatureModel(encoder, objective, feature_stats=stats)
    rank, world = dist_info()
    if rank == 0:
        write_json(out / RUN_CONFIG, info)
    loader = make_loader(
        ds,
        data.batch_size,
        seed=seed,
        num_workers=data.num_workers,
        collate_fn=collate_bags,
        drop_last=len(ds) >= data.batch_size * world,
    )
    eval_fn = make_eval_fn(features, eval_ids, data.eval_max_tiles, seed)
    title = f"slidefm pretrain ({config}, seed {seed}): {out.name}"
    finished = fit_run(model, loader, tcfg, info, eval_fn, stop_at_step=stop_at_step, title=title)
    if rank == 0 and finished:
        extra = {"pretrain_config": cfgd, **tile_encoder_info(ds.paths[0])}
        if cfg.published:  # the published layout: a drop-in for the downloaded weights
            save_published(out, info, encoder, final, extra)
        else:
            save_final(out, info, encoder.save_checkpoint, final, "encoder_checkpoint", extra)
    return info


def final_output(cfg: PretrainRunConfig) -> str:
    """``encoder.pt`` (slidefm checkpoint), or the published entry's weight file name."""
    from slidefm.models.registry import PUBLISHED

    return PUBLISHED[cfg.encoder].export_file if cfg.published else "encoder.pt"


def save_published(out: Path, info: dict, encoder: Any, name: str, extra: dict) -> None:
    """The continued-pretrained weights in the published layout (the mask token, not part of
    it, stays in the training checkpoints); the run's provenance goes to run_config.json."""
    from slidefm.models.registry import save_published_weights
    from slidefm.train.run_dir import save_final

    def save(path: Path, prov: dict) -> None:
        save_published_weights(encoder.published, path)
        info["use_with"] = f"slidefm embed-slides --model {encoder.name} --weights {path}"

    save_final(out, info, save, name, "encoder_weights", extra)
