"""``slidefm pretrain``: masked-feature-modeling pretraining of a slide encoder on feature files.

Outputs in ``--out``: ``checkpoints/step_*.pt`` (exact resume: re-run the same command),
``metrics.csv`` and ``loss_curve.png`` (loss, lr, RankMe of held-out slide embeddings),
``run_config.json`` (resolved config, hash, seed, slides) and the final ``encoder.pt``
(``SlideEncoder.save_checkpoint``) for ``slidefm embed-slides --checkpoint``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from slidefm.config import apply_overrides, config_hash, from_dict, load_yaml, resolve_config_path
from slidefm.eval.rankme import rankme
from slidefm.io.bags import FeatureBagDataset, collate_bags, list_feature_files
from slidefm.io.manifest import read_manifest
from slidefm.models.pretrain import MaskedFeatureModel, PretrainConfig, feature_stats
from slidefm.pipelines.embed import embed_dataset
from slidefm.runtime import dist_info, seed_everything
from slidefm.train.data import make_loader, training_bags
from slidefm.train.loop import TrainConfig
from slidefm.train.run_dir import (
    RUN_CONFIG,
    TRAIN_OUTPUTS,
    check_train_section,
    claim_run_dir,
    fit_run,
    inputs_hash,
    run_identity,
    save_final,
    write_json,
)

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
    encoder: str = "tiny"  # name/path under configs/slide_encoder/
    encoder_overrides: dict = dataclasses.field(default_factory=dict)
    match_input_dim: bool = False  # set the encoder's input_dim from the feature files
    standardize_inputs: bool = True  # encoder input (x − cohort mean) / std, saved in encoder.pt
    objective: dict = dataclasses.field(default_factory=dict)  # PretrainConfig fields
    data: dict = dataclasses.field(default_factory=dict)  # PretrainDataConfig fields
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields


def load_run_config(path: str | None, overrides: list[str] | None) -> dict[str, Any]:
    """YAML (+ overrides) → plain dict, validated by building every section's dataclass."""
    raw = apply_overrides(
        load_yaml(resolve_config_path(path, "pretrain")) if path else {}, overrides
    )
    run = from_dict(PretrainRunConfig, raw)
    from_dict(PretrainConfig, run.objective)
    from_dict(PretrainDataConfig, run.data)
    check_train_section(run.train)
    return dataclasses.asdict(run)


def select_slides(features: str | Path, manifest: str | None, split: str | None) -> list[str]:
    """Slide ids to pretrain on: the feature folder, or the manifest's rows (its ``split``
    column restricted to ``split`` when both exist)."""
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
    from slidefm.models.slide_encoder import SlideEncoder

    out = Path(out)
    cfgd = load_run_config(config, overrides)
    objective = from_dict(PretrainConfig, cfgd["objective"])
    data = from_dict(PretrainDataConfig, cfgd["data"])
    tcfg = from_dict(TrainConfig, {**cfgd["train"], "out_dir": str(out), "seed": seed})
    ids = select_slides(features, manifest, split)
    train_ids, hold_ids = split_holdout(ids, data.holdout_fraction, data.min_holdout, seed)
    ds = training_bags(features, train_ids, data, seed)
    in_dim = int(ds.slide(0).features.shape[1])
    enc_kw = dict(cfgd["encoder_overrides"])
    if cfgd["match_input_dim"]:
        enc_kw["input_dim"] = in_dim
    run_hash = config_hash({**cfgd, "encoder_overrides": enc_kw})
    eval_ids = hold_ids or train_ids
    files = [*ds.paths, *(Path(features) / f"{s}.h5" for s in hold_ids)]
    identity = run_identity(run_hash, inputs_hash(files, [train_ids, eval_ids]), seed)
    info = {
        "config": cfgd,
        "config_name": config,
        "config_hash": run_hash,
        "seed": seed,
        "identity": identity,
        "features": str(Path(features).resolve()),
        "num_train_slides": len(train_ids),
        "holdout_slides": hold_ids,
        "rankme_on": "holdout" if hold_ids else "train (too few slides for a holdout)",
    }
    if dist_info()[0] == 0:
        claim_run_dir(out, identity, overwrite, (*TRAIN_OUTPUTS, "encoder.pt"))
    seed_everything(seed)
    encoder = SlideEncoder.from_config(cfgd["encoder"], **enc_kw)
    if encoder.config.input_dim != in_dim:
        raise ValueError(
            f"features are {in_dim}-d but encoder {cfgd['encoder']!r} expects "
            f"{encoder.config.input_dim}-d; --set encoder_overrides.input_dim={in_dim} "
            "or --set match_input_dim=true"
        )
    order = np.random.default_rng(seed).permutation(len(ds))  # a fair sample when capped
    stats = feature_stats(ds.slide(int(i)).features for i in order)
    if cfgd["standardize_inputs"]:
        encoder.set_input_stats(*stats)
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
    eval_ds = FeatureBagDataset(
        features, slide_ids=eval_ids, max_tiles=data.eval_max_tiles, seed=seed
    )

    def eval_fn(m: MaskedFeatureModel) -> dict[str, float]:
        _, z = embed_dataset(m.encoder, eval_ds)
        return {"rankme": rankme(z), "embedding_std": float(z.std(axis=0).mean())}

    finished = fit_run(model, loader, tcfg, info, eval_fn, stop_at_step=stop_at_step)
    if rank == 0 and finished:
        extra = {"pretrain_config": cfgd}
        save_final(out, info, encoder.save_checkpoint, "encoder.pt", "encoder_checkpoint", extra)
    return info


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.cli import add_common
    from slidefm.train.run_dir import add_overwrite

    p = sub.add_parser("pretrain", help="masked-feature-modeling pretraining of a slide encoder")
    p.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--out", required=True, help="output folder (re-run the command to resume)")
    p.add_argument("--manifest", help="CSV with slide_id (and split): restricts the slides")
    p.add_argument(
        "--split", default="train", help="manifest split used for pretraining (default train)"
    )
    add_overwrite(p)
    add_common(p, "pretrain")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.config:
        raise ValueError("pass --config (e.g. tiny or titan_like under configs/pretrain/)")
    info = run_pretrain(
        args.config,
        args.features,
        args.out,
        args.overrides,
        args.seed,
        manifest=args.manifest,
        split=args.split,
        overwrite=args.overwrite,
    )
    final = info.get("final", {})
    if dist_info()[0] != 0:
        return 0
    print(
        f"pretrained {info['steps']} steps on {info['num_train_slides']} slides: "
        f"loss {final.get('loss', float('nan')):.4g}, RankMe {final.get('rankme', float('nan')):.3g}"
        f" ({info['rankme_on']}); encoder: {info.get('encoder_checkpoint', 'not yet (stopped)')}"
    )
    return 0
