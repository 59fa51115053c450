"""``slidefm align``: contrastive slide ↔ report alignment on a cohort manifest.

Inputs: a manifest (``slide_id, case_id, split`` and a report column), slides as tile-feature
files (``--features``, through a slide encoder) or precomputed slide embeddings
(``--embeddings`` H5), and a SentencePiece tokenizer (``--tokenizer``; without it one is trained
on the *training* reports and saved as ``tokenizer.model``).

Splits are patient-level (the manifest reader refuses a case in two splits): training uses
``split == train`` only, validation metrics ``split == val``; ``test`` is never read here.

Outputs in ``--out``: ``checkpoints/`` (exact resume: re-run the same command), ``metrics.csv``
and ``loss_curve.png`` (train loss, val loss, val slide→report Recall@K), ``run_config.json``,
and the final self-contained ``align.pt`` (``SlideTextModel.save_checkpoint``) for
``slidefm zero-shot`` / ``slidefm retrieve``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from slidefm.config import apply_overrides, config_hash, from_dict, load_yaml, resolve_config_path
from slidefm.encoders.text import ReportTokenizer, TextTowerConfig, train_tokenizer
from slidefm.eval.retrieval import build_index, per_query_metrics
from slidefm.io.bags import FeatureBagDataset
from slidefm.io.embeddings import read_embeddings
from slidefm.io.manifest import read_manifest
from slidefm.io.pairs import SlideReportPairs, collate_pairs
from slidefm.models.clip import AlignModelConfig, SlideTextModel, clip_loss
from slidefm.pipelines.embed import embed_dataset, file_sha256
from slidefm.runtime import dist_info, pick_device, seed_everything
from slidefm.train.data import make_loader, training_bags
from slidefm.train.loop import TrainConfig
from slidefm.train.run_dir import (
    RUN_CONFIG,
    TRAIN_OUTPUTS,
    add_overwrite,
    check_train_section,
    claim_run_dir,
    fit_run,
    inputs_hash,
    run_identity,
    save_final,
    write_json,
)

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclasses.dataclass(frozen=True)
class AlignDataConfig:
    batch_size: int = 32  # patients (pairs) per micro-batch per rank; negatives = the others
    text_column: str = "report"
    max_tiles: int | None = 1024  # random tile subset per slide when the encoder trains
    crop: Any = None  # window side(s) in grid cells when the encoder trains; null = whole slide
    augment: bool = True  # rotations/flips/feature dropout when the encoder trains
    feature_dropout: float = 0.1
    precompute_frozen: bool = True  # frozen encoder: embed every slide once, train the heads
    standardize: bool = True  # precomputed slide embeddings: z-score per dim (training stats)
    eval_max_tiles: int | None = 4096  # tiles per slide when embedding whole slides
    sentence_dropout: float = 0.0  # report augmentation: drop sentences with this probability
    shuffle_sentences: bool = False
    tokenizer_vocab_size: int = 2000  # only when no --tokenizer is given
    num_workers: int = 0
    cache: bool = True


@dataclasses.dataclass(frozen=True)
class AlignRunConfig:
    # Slide encoder: a checkpoint (e.g. <pretrain out>/encoder.pt), "random:<config name>" for
    # the untrained-encoder ablation (recorded as random), or "" with --embeddings.
    slide_encoder: str = ""
    model: dict = dataclasses.field(default_factory=dict)  # AlignModelConfig fields
    data: dict = dataclasses.field(default_factory=dict)  # AlignDataConfig fields
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields


def load_run_config(path: str | None, overrides: list[str] | None) -> dict[str, Any]:
    """YAML (+ overrides) → plain dict, validated by building every section's dataclass."""
    raw = apply_overrides(load_yaml(resolve_config_path(path, "align")) if path else {}, overrides)
    run = from_dict(AlignRunConfig, raw)
    from_dict(AlignModelConfig, run.model)
    from_dict(TextTowerConfig, run.model.get("text") or {})
    from_dict(AlignDataConfig, run.data)
    check_train_section(run.train)
    return dataclasses.asdict(run)


# -- inputs --------------------------------------------------------------------------------
def case_reports(df: pd.DataFrame, text_column: str) -> tuple[list[str], list[list[int]]]:
    """(case ids, row indices of each case's slides) and checks every case has a report."""
    if text_column not in df:
        raise ValueError(
            f"manifest has no report column {text_column!r}; set data.text_column "
            f"(columns: {', '.join(df.columns)})"
        )
    cases = list(dict.fromkeys(df["case_id"].astype(str)))
    rows = df.groupby(df["case_id"].astype(str), sort=False).indices
    missing = [c for c in cases if df[text_column].iloc[rows[c]].dropna().astype(str).eq("").all()]
    if missing:
        raise ValueError(f"no report text for case(s) {', '.join(missing[:5])}")
    return cases, [list(rows[c]) for c in cases]


def first_report(df: pd.DataFrame, rows: list[int], text_column: str) -> str:
    vals = [str(v) for v in df[text_column].iloc[rows] if isinstance(v, str) and v.strip()]
    return vals[0] if vals else ""


def load_slide_encoder(
    spec: str, input_dim: int | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(encoder, provenance) from a checkpoint path or ``random:<config>`` (recorded as such).

    A random encoder takes ``input_dim`` from the tile features (as ``pretrain`` does with
    ``match_input_dim``), so the ablation has exactly the pretrained architecture.
    """
    from slidefm.models.slide_encoder import SlideEncoder

    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX) :]
        log.warning("RANDOM WEIGHTS: the slide encoder %r is untrained (ablation)", name)
        kw = {"input_dim": int(input_dim)} if input_dim else {}
        return SlideEncoder.from_config(name, **kw), {
            "slide_encoder": spec,
            "slide_encoder_weights": "random",
            "slide_encoder_sha256": "random",
        }
    if not Path(spec).is_file():
        raise FileNotFoundError(
            f"slide encoder checkpoint {spec} not found; run `slidefm pretrain` (it writes "
            "encoder.pt) or use slide_encoder=random:<config> for an untrained ablation"
        )
    return SlideEncoder.from_checkpoint(spec), {
        "slide_encoder": str(Path(spec).resolve()),
        "slide_encoder_weights": "pretrained",
        "slide_encoder_sha256": file_sha256(spec),
    }


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


# -- evaluation during training ------------------------------------------------------------
@torch.no_grad()
def val_metrics(
    model: SlideTextModel, slide_emb: np.ndarray, reports: list[str], ks=(1, 5)
) -> dict[str, float]:
    """Contrastive loss and slide→report Recall@K over the validation patients (one batch)."""
    dev = model.logit_scale.device
    zs = model.encode_slide(embeddings=torch.from_numpy(slide_emb).to(dev))
    zt = model.embed_texts(reports)
    out = {"val_loss": float(clip_loss(zs, zt, model.scale, world_size=1, rank=0))}
    ids = [str(i) for i in range(len(reports))]
    ranked, _ = build_index("exact", zt.cpu().numpy(), ids).search(zs.cpu().numpy(), max(ks))
    per = per_query_metrics(ranked, [{i} for i in ids], ks)
    out.update({f"val_s2r_recall@{k}": float(per[f"recall@{k}"].mean()) for k in ks})
    return out


# -- run -----------------------------------------------------------------------------------
def run_align(
    config: str | None,
    manifest: str | Path,
    out: str | Path,
    features: str | Path | None = None,
    embeddings: str | Path | None = None,
    tokenizer: str | Path | None = None,
    overrides: list[str] | None = None,
    seed: int = 0,
    stop_at_step: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Align and write the outputs listed in the module docstring; returns run info.

    ``out`` belongs to one (config, manifest rows + slide inputs + tokenizer, seed): another
    one is refused unless ``overwrite`` (see ``train.run_dir.claim_run_dir``)."""
    out = Path(out)
    cfgd = load_run_config(config, overrides)
    data = from_dict(AlignDataConfig, cfgd["data"])
    mcfg = from_dict(AlignModelConfig, cfgd["model"])
    tcfg = from_dict(TrainConfig, {**cfgd["train"], "out_dir": str(out), "seed": seed})
    if (features is None) == (embeddings is None):
        raise ValueError("give exactly one of --features DIR or --embeddings H5")
    df = read_manifest(manifest, required=("slide_id", "case_id"))
    if "split" not in df:
        raise ValueError(
            f"manifest {manifest} has no 'split' column: alignment needs patient-level "
            "train/val/test splits (slidefm never trains on unsplit cohorts)"
        )
    split = df["split"].astype(str)
    train_df = df[split == "train"].reset_index(drop=True)
    val_df = df[split == "val"].reset_index(drop=True)
    if len(train_df) == 0:
        raise ValueError(f"manifest {manifest} has no rows with split == 'train'")
    train_cases, train_rows = case_reports(train_df, data.text_column)
    train_reports = [first_report(train_df, r, data.text_column) for r in train_rows]
    val_cases, val_rows = case_reports(val_df, data.text_column) if len(val_df) else ([], [])
    val_reports = [first_report(val_df, r, data.text_column) for r in val_rows]

    rank, world = dist_info()
    # Claim --out before anything is read from or written to it (a tokenizer trained there
    # by another run must not be reused).
    run_df = pd.concat([train_df, val_df], ignore_index=True)
    run_ids = run_df["slide_id"].astype(str).tolist()
    files = [Path(features) / f"{s}.h5" for s in run_ids] if features is not None else []
    files = [f for f in files if f.is_file()] + [Path(x) for x in (embeddings, tokenizer) if x]
    cols = ["slide_id", "case_id", "split", data.text_column]
    rows = run_df[[c for c in cols if c in run_df]].astype(str).values.tolist()
    identity = run_identity(config_hash(cfgd), inputs_hash(files, rows), seed)
    if rank == 0:
        claim_run_dir(out, identity, overwrite, (*TRAIN_OUTPUTS, "align.pt", "tokenizer.*"))
    out.mkdir(parents=True, exist_ok=True)
    tok_info: dict[str, Any]
    if tokenizer:
        tok_path = Path(tokenizer)
        tok_info = {"tokenizer": str(tok_path.resolve()), "tokenizer_trained_here": False}
    else:  # deterministic, so every rank (and a resumed run) makes the same file
        tok_path = out / "tokenizer.model"
        if not tok_path.is_file():
            train_tokenizer(
                train_reports,
                data.tokenizer_vocab_size,
                tok_path,
                seed=seed,
                hard_vocab_limit=False,  # small cohorts: fewer pieces rather than an error
            )
        tok_info = {"tokenizer": str(tok_path), "tokenizer_trained_here": True}
    tok_info["tokenizer_sha256"] = ReportTokenizer(tok_path).sha256

    seed_everything(seed)  # a random:<config> encoder and the heads are drawn from the seed
    enc, enc_info = (None, {"slide_encoder": "none (precomputed embeddings)"})
    if cfgd["slide_encoder"]:
        in_dim = None
        if features is not None:
            first = FeatureBagDataset(
                features, slide_ids=train_df["slide_id"].astype(str).tolist()[:1]
            )
            in_dim = int(first.slide(0).features.shape[1])
        enc, enc_info = load_slide_encoder(cfgd["slide_encoder"], in_dim)
        if enc_info["slide_encoder_weights"] == "random" and features is not None:
            # Random weights, but the same input standardisation a pretrained encoder carries
            # (statistics of the training slides): the ablation isolates the learned weights.
            from slidefm.models.pretrain import feature_stats

            bags = FeatureBagDataset(features, slide_ids=train_df["slide_id"].astype(str).tolist())
            enc.set_input_stats(*feature_stats(bags.slide(i).features for i in range(len(bags))))
    elif features is not None:
        raise ValueError(
            "--features needs a slide encoder: --slide-encoder <pretrain out>/encoder.pt "
            "(or random:<config> for an ablation)"
        )
    emb_attrs: dict[str, Any] = {}
    if embeddings is not None:
        emb_ids, emb_all, emb_attrs = read_embeddings(embeddings)
        slide_dim = int(emb_all.shape[1])
        if enc is not None and mcfg.slide_trainable != "frozen":
            raise ValueError("precomputed --embeddings cannot train the slide encoder; use frozen")
        if emb_attrs.get("checkpoint_sha256") == "random":
            enc_info["slide_encoder_weights"] = "random"
            log.warning("RANDOM WEIGHTS: %s comes from an untrained slide encoder", embeddings)
    else:
        slide_dim = int(enc.embed_dim)
    run_hash = config_hash({**cfgd, "tokenizer_sha256": tok_info["tokenizer_sha256"]})
    info: dict[str, Any] = {
        "config": cfgd,
        "config_name": config,
        "config_hash": run_hash,
        "seed": seed,
        "identity": identity,
        "manifest": str(Path(manifest).resolve()),
        "inputs": str(Path(features or embeddings).resolve()),
        "input_kind": "features" if features is not None else "embeddings",
        "num_train_cases": len(train_cases),
        "num_val_cases": len(val_cases),
        **tok_info,
        **enc_info,
    }
    model = SlideTextModel(mcfg, slide_dim, tok_path, slide_encoder=enc)
    model.to(pick_device(tcfg.device) if world == 1 else torch.device("cpu"))
    if rank == 0:
        write_json(out / RUN_CONFIG, info)

    # Slides of training: precomputed embeddings (frozen encoder / H5) or bags (trainable).
    train_ids = train_df["slide_id"].astype(str).tolist()
    val_ids = [val_df["slide_id"].iloc[r[0]] for r in val_rows]  # one slide per val case
    use_bags = features is not None and not (
        mcfg.slide_trainable == "frozen" and data.precompute_frozen
    )
    if use_bags:
        pairs_kw: dict[str, Any] = {"bags": training_bags(features, train_ids, data, seed)}
    else:
        emb_src = {"features": features, "embeddings": embeddings}
        log.info("embedding %d training slides once (frozen encoder)", len(train_ids))
        train_emb = slide_embeddings(
            model, train_ids, max_tiles=data.eval_max_tiles, seed=seed, **emb_src
        )
        pairs_kw = {"embeddings": train_emb, "slide_ids": train_ids}
        if data.standardize:
            model.set_slide_stats(torch.from_numpy(train_emb))
    ds = SlideReportPairs(
        train_rows,
        train_reports,
        model.tokenize,
        seed=seed,
        sentence_dropout=data.sentence_dropout,
        shuffle_sentences=data.shuffle_sentences,
        **pairs_kw,
    )
    loader = make_loader(
        ds,
        data.batch_size,
        seed=seed,
        num_workers=data.num_workers,
        collate_fn=collate_pairs,
        drop_last=len(ds) >= 2 * data.batch_size * world,
    )
    val_emb_cache: dict[str, np.ndarray] = {}

    def eval_fn(m: SlideTextModel) -> dict[str, float]:
        if not val_ids:
            return {}
        if "z" not in val_emb_cache or (use_bags and not m.encoder_frozen):
            z = slide_embeddings(
                m,
                val_ids,
                features=features,
                embeddings=embeddings,
                max_tiles=data.eval_max_tiles,
                seed=seed,
            )
            if m.encoder_frozen or embeddings is not None:
                val_emb_cache["z"] = z
        else:
            z = val_emb_cache["z"]
        return val_metrics(m, z, val_reports)

    finished = fit_run(model, loader, tcfg, info, eval_fn, stop_at_step=stop_at_step)
    if rank == 0 and finished:
        extra = {**enc_info, **tok_info, "align_config": cfgd}
        save_final(out, info, model.save_checkpoint, "align.pt", "checkpoint", extra)
    return info


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.cli import add_common

    p = sub.add_parser("align", help="contrastive slide-report alignment (CLIP-style)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="folder of <slide_id>.h5 tile-feature files")
    src.add_argument("--embeddings", help="slide-embedding H5 from `slidefm embed-slides`")
    p.add_argument("--manifest", required=True, help="CSV: slide_id, case_id, split, report")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: train on train reports)")
    p.add_argument(
        "--slide-encoder",
        help="slide-encoder checkpoint (<pretrain out>/encoder.pt) or random:<config>; "
        "overrides the config's slide_encoder",
    )
    p.add_argument("--out", required=True, help="output folder (re-run the command to resume)")
    add_overwrite(p)
    add_common(p, "align")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.config:
        raise ValueError("pass --config (e.g. tiny or titan_like under configs/align/)")
    overrides = list(args.overrides)
    if args.slide_encoder:
        overrides.append(f"slide_encoder={args.slide_encoder}")
    info = run_align(
        args.config,
        args.manifest,
        args.out,
        features=args.features,
        embeddings=args.embeddings,
        tokenizer=args.tokenizer,
        overrides=overrides,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    if dist_info()[0] != 0:
        return 0
    final = info.get("final", {})
    rnd = " (RANDOM slide encoder)" if info.get("slide_encoder_weights") == "random" else ""
    print(
        f"aligned {info['steps']} steps on {info['num_train_cases']} training patients{rnd}: "
        f"loss {final.get('loss', float('nan')):.4g}, val loss "
        f"{final.get('val_loss', float('nan')):.4g}, val slide→report R@5 "
        f"{final.get('val_s2r_recall@5', float('nan')):.3f}; "
        f"checkpoint: {info.get('checkpoint', 'not yet (stopped)')}"
    )
    return 0
