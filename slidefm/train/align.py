"""Contrastive slide ↔ report alignment on a cohort manifest (``slidefm align``).

Inputs: a manifest (``slide_id, case_id, split`` and a report column), slides as tile-feature
files (``features``, through a slide encoder) or precomputed slide embeddings (``embeddings``
H5), and a SentencePiece tokenizer (without one, one is trained on the *training* reports and
saved as ``tokenizer.model``).

Splits are patient-level (the manifest reader refuses a case in two splits): training uses
``split == train`` only, validation metrics ``split == val``; ``test`` is never read here.

Outputs in ``out``: ``checkpoints/`` (exact resume: re-run the same command), ``metrics.csv``
and ``loss_curve.png`` (train loss, val loss, val slide→report Recall@K), ``run_config.json``,
and the final self-contained ``align.pt`` (``SlideTextModel.save_checkpoint``) for
``slidefm zero-shot`` / ``slidefm retrieve``. With ``train.select_metric`` (the configs use
``val_loss``) ``align.pt`` holds the weights of the evaluation step with the best value, not
the last step's; ``run_config.json`` and the checkpoint record which step (``selected``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from slidefm.config import config_hash
from slidefm.encoders.registry import sha256_file
from slidefm.eval.embed import slide_embeddings
from slidefm.eval.ood import DomainReference
from slidefm.io.bags import FeatureBagDataset
from slidefm.io.provenance import random_weight_notes, tile_encoder_info
from slidefm.io.reports import case_reports, first_report
from slidefm.models.clip import AlignModelConfig, SlideTextModel
from slidefm.runtime import dist_info, no_grad, pick_device, seed_everything
from slidefm.train.loop import TrainConfig
from slidefm.train.run_dir import config_record, train_config
from slidefm.train.run_dir import load_run_config as load_typed_config

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclasses.dataclass(frozen=True)
class AlignDataConfig:
    batch_size: int = 32  # patients (pairs) per micro-batch per rank; negatives = the others
    text_column: str = "report"
    # Optional manifest column (e.g. a diagnosis) of the validation patients: adds
    # val_same_label_mass, a validation metric that tracks zero-shot classification (see
    # val_metrics) and can select the kept step (train.select_metric).
    val_label_column: str = ""
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
    # the untrained-encoder ablation (recorded as random), a published registry entry
    # (gigapath, titan, chief; with slide_encoder_weights), or "" with --embeddings.
    slide_encoder: str = ""
    slide_encoder_weights: str = ""  # published entries: hub | PATH (published layout) | random
    model: AlignModelConfig = dataclasses.field(default_factory=AlignModelConfig)
    data: AlignDataConfig = dataclasses.field(default_factory=AlignDataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def load_run_config(
    path: str | None, overrides: list[str] | None, flags: dict[str, Any] | None = None
) -> AlignRunConfig:
    """The typed config: YAML < ``flags`` (``--slide-encoder``) < ``overrides`` (``--set``)."""
    return load_typed_config(AlignRunConfig, path, overrides, "align", flags)


def load_slide_encoder(
    spec: str, input_dim: int | None = None, weights: str = ""
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(encoder, provenance) from a checkpoint path, ``random:<config>`` (recorded as such) or
    a published registry entry with ``weights`` (behind the bag interface: it reads each
    tile's level-0 coords).

    A random encoder takes ``input_dim`` from the tile features (as ``pretrain`` does with
    ``match_input_dim``), so the ablation has exactly the pretrained architecture.
    """
    from slidefm.models.registry import PUBLISHED, slide_encoder_from_spec
    from slidefm.models.slide_encoder import SlideEncoder

    if spec in PUBLISHED:
        from slidefm.models.published.bag import PublishedBagEncoder

        if not weights:
            raise ValueError(
                f"published slide encoder {spec!r} needs --slide-encoder-weights hub | PATH "
                "(published layout) | random"
            )
        enc, info = slide_encoder_from_spec(spec, weights, input_dim)
        return PublishedBagEncoder(enc), info
    if weights:
        raise ValueError(
            f"--slide-encoder-weights is for published encoders ({', '.join(PUBLISHED)}); "
            f"{spec!r} records its own weights"
        )

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
        "slide_encoder_sha256": sha256_file(spec),
    }


@no_grad
def val_metrics(
    model: SlideTextModel,
    slide_emb: np.ndarray,
    reports: list[str],
    ks=(1, 5),
    labels: list[str] | None = None,
) -> dict[str, float]:
    """Contrastive loss and slide→report Recall@K over the validation patients (one batch).

    With ``labels`` (one per patient), also ``val_same_label_mass``: the mean over slides of
    the softmax probability the model puts on reports *of the same label* (chance = the
    label's share of the patients). The exact-report loss cannot tell a model that confuses
    two same-diagnosis reports from one that confuses diagnoses: on small cohorts it climbs
    while the diagnosis signal that zero-shot uses still improves (measured: selecting by
    val_loss kept step 10 of 300 and halved zero-shot balanced accuracy).
    """
    import torch

    from slidefm.eval.retrieval import build_index, per_query_metrics
    from slidefm.models.clip import clip_loss

    dev = model.logit_scale.device
    zs = model.encode_slide(embeddings=torch.from_numpy(slide_emb).to(dev))
    zt = model.embed_texts(reports)
    out = {"val_loss": float(clip_loss(zs, zt, model.scale, world_size=1, rank=0))}
    if labels is not None:
        p = (model.scale * zs @ zt.T).softmax(dim=1).cpu().numpy()
        lab = np.asarray(labels, dtype=object)
        same = lab[:, None] == lab[None, :]
        out["val_same_label_mass"] = float((p * same).sum(axis=1).mean())
    ids = [str(i) for i in range(len(reports))]
    ranked, _ = build_index("exact", zt.cpu().numpy(), ids).search(zs.cpu().numpy(), max(ks))
    per = per_query_metrics(ranked, [{i} for i in ids], ks)
    out.update({f"val_s2r_recall@{k}": float(per[f"recall@{k}"].mean()) for k in ks})
    return out


@no_grad
def domain_reference(
    model: SlideTextModel,
    train_emb: np.ndarray | None,
    train_ids: list[str],
    val_ids: list[str],
    features: str | Path | None,
    embeddings: str | Path | None,
    max_tiles: int | None,
    seed: int,
    max_reference: int = 2048,
) -> DomainReference:
    """The trained model's out-of-domain reference (``slidefm.eval.ood``): aligned embeddings
    of the training slides, calibrated on the validation slides."""
    import torch

    model.eval()
    src = {"features": features, "embeddings": embeddings}
    if train_emb is None:  # the slide encoder trained: embed with its final weights
        ids = train_ids
        if len(ids) > max_reference:
            pick = np.random.default_rng(seed).choice(len(ids), max_reference, replace=False)
            ids = [ids[i] for i in np.sort(pick)]
        train_emb = slide_embeddings(model, ids, max_tiles=max_tiles, seed=seed, **src)
    dev = model.logit_scale.device

    def joint(e: np.ndarray) -> np.ndarray:
        return model.encode_slide(embeddings=torch.from_numpy(e).to(dev)).cpu().numpy()

    held = None
    if val_ids:
        held = joint(slide_embeddings(model, val_ids, max_tiles=max_tiles, seed=seed, **src))
    return DomainReference.build(joint(train_emb), held, max_reference=max_reference, seed=seed)


# -- run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class AlignCohort:
    """The training and validation patients of a manifest: rows, one report per case and,
    with ``data.val_label_column``, one label per validation case."""

    train_df: pd.DataFrame
    val_df: pd.DataFrame
    train_cases: list[str]
    train_rows: list[list[int]]
    train_reports: list[str]
    val_cases: list[str]
    val_rows: list[list[int]]
    val_reports: list[str]
    val_labels: list[str] | None

    @property
    def train_ids(self) -> list[str]:
        return self.train_df["slide_id"].astype(str).tolist()

    @property
    def val_ids(self) -> list[str]:
        """One slide per validation case."""
        return [self.val_df["slide_id"].iloc[r[0]] for r in self.val_rows]


def cohort_info(
    manifest: str | Path, features: Any, embeddings: Any, cohort: AlignCohort
) -> dict[str, Any]:
    """What ``run_config.json`` records of the inputs and patients."""
    return {
        "manifest": str(Path(manifest).resolve()),
        "inputs": str(Path(features or embeddings).resolve()),
        "input_kind": "features" if features is not None else "embeddings",
        "num_train_cases": len(cohort.train_cases),
        "num_val_cases": len(cohort.val_cases),
    }


def read_cohort(manifest: str | Path, data: AlignDataConfig) -> AlignCohort:
    """The manifest's ``train`` and ``val`` patients with their reports (``test`` unread)."""
    from slidefm.io.manifest import read_manifest

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
    val_cases, val_rows = case_reports(val_df, data.text_column) if len(val_df) else ([], [])
    val_labels = None
    if data.val_label_column:
        if data.val_label_column not in val_df:
            raise ValueError(
                f"manifest has no column {data.val_label_column!r} (data.val_label_column)"
            )
        val_labels = [str(val_df[data.val_label_column].iloc[r[0]]) for r in val_rows]
    return AlignCohort(
        train_df,
        val_df,
        train_cases,
        train_rows,
        [first_report(train_df, r, data.text_column) for r in train_rows],
        val_cases,
        val_rows,
        [first_report(val_df, r, data.text_column) for r in val_rows],
        val_labels,
    )


def prepare_tokenizer(
    tokenizer: str | Path | None, out: Path, reports: list[str], vocab_size: int, seed: int
) -> tuple[Path, dict[str, Any]]:
    """(tokenizer path, provenance): the given one, or one trained on the training reports
    into ``out`` (deterministic, so every rank and a resumed run make the same file)."""
    from slidefm.encoders.text import ReportTokenizer, train_tokenizer

    if tokenizer:
        tok_path = Path(tokenizer)
        info: dict[str, Any] = {
            "tokenizer": str(tok_path.resolve()),
            "tokenizer_trained_here": False,
        }
    else:
        tok_path = out / "tokenizer.model"
        if not tok_path.is_file():
            train_tokenizer(
                reports,
                vocab_size,
                tok_path,
                seed=seed,
                hard_vocab_limit=False,  # small cohorts: fewer pieces rather than an error
            )
        info = {"tokenizer": str(tok_path), "tokenizer_trained_here": True}
    info["tokenizer_sha256"] = ReportTokenizer(tok_path).sha256
    return tok_path, info


def prepare_slide_encoder(
    spec: str, features: str | Path | None, train_ids: list[str], weights: str = ""
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """(encoder or None, provenance) of the config's ``slide_encoder``. A random encoder gets
    the input width and the input standardisation of the training slides' features, so the
    ablation differs from a pretrained encoder in its learned weights only."""
    if not spec:
        if features is not None:
            raise ValueError(
                "--features needs a slide encoder: --slide-encoder <pretrain out>/encoder.pt "
                "(or random:<config> for an ablation)"
            )
        return None, {"slide_encoder": "none (precomputed embeddings)"}
    in_dim = None
    if features is not None:
        from slidefm.eval.mil_cv import check_slide_encoder_inputs

        first = FeatureBagDataset(features, slide_ids=train_ids[:1])
        in_dim = int(first.slide(0).features.shape[1])
        # a published encoder refuses others' features before its weights are read
        check_slide_encoder_inputs(spec, first.paths[0])
    enc, info = load_slide_encoder(spec, in_dim, weights)
    if getattr(enc, "needs_coords", False):  # published: raw inputs as it was trained on
        return enc, info
    if info["slide_encoder_weights"] == "random" and features is not None:
        from slidefm.models.pretrain import feature_stats

        bags = FeatureBagDataset(features, slide_ids=train_ids)
        enc.set_input_stats(*feature_stats(bags.slide(i).features for i in range(len(bags))))
    return enc, info


def input_info(
    features: str | Path | None, embeddings: str | Path | None, train_ids: list[str]
) -> tuple[dict[str, Any], int | None, bool]:
    """(tile-encoder provenance, slide-embedding width of ``embeddings`` or None, whether
    ``embeddings`` come from a random slide encoder)."""
    from slidefm.io.embeddings import read_embeddings

    if features is not None:
        first = FeatureBagDataset(features, slide_ids=train_ids[:1])
        return tile_encoder_info(first.paths[0]), None, False
    _, emb_all, attrs = read_embeddings(embeddings)
    tile_info = {
        "tile_encoder": str(attrs.get("tile_encoder", "unknown")),
        "tile_encoder_weights": str(attrs.get("tile_encoder_weights", "unknown")),
    }
    return tile_info, int(emb_all.shape[1]), attrs.get("checkpoint_sha256") == "random"


def check_embeddings_input(
    enc: Any, mcfg: AlignModelConfig, embeddings: str | Path, random: bool, enc_info: dict
) -> None:
    """Precomputed embeddings cannot train a slide encoder; ones made by a random encoder are
    recorded (and logged) as random."""
    if enc is not None and mcfg.slide_trainable != "frozen":
        raise ValueError("precomputed --embeddings cannot train the slide encoder; use frozen")
    if random:
        enc_info["slide_encoder_weights"] = "random"
        log.warning("RANDOM WEIGHTS: %s comes from an untrained slide encoder", embeddings)


def claim_output(
    out: Path,
    cfg: AlignRunConfig,
    cohort: AlignCohort,
    inputs: dict[str, Any],
    seed: int,
    overwrite: bool,
) -> dict[str, Any]:
    """The run's identity (config, manifest rows + slide inputs + tokenizer, seed); rank 0
    claims ``out`` with it before anything is read from or written to it (a tokenizer trained
    there by another run must not be reused)."""
    from slidefm.train.run_dir import TRAIN_OUTPUTS, claim_run_dir, inputs_hash, run_identity

    features, embeddings, tokenizer = inputs["features"], inputs["embeddings"], inputs["tokenizer"]
    run_df = pd.concat([cohort.train_df, cohort.val_df], ignore_index=True)
    run_ids = run_df["slide_id"].astype(str).tolist()
    files = [Path(features) / f"{s}.h5" for s in run_ids] if features is not None else []
    files = [f for f in files if f.is_file()] + [Path(x) for x in (embeddings, tokenizer) if x]
    cols = ["slide_id", "case_id", "split", cfg.data.text_column]
    rows = run_df[[c for c in cols if c in run_df]].astype(str).values.tolist()
    identity = run_identity(config_hash(config_record(cfg)), inputs_hash(files, rows), seed)
    if dist_info()[0] == 0:
        claim_run_dir(out, identity, overwrite, (*TRAIN_OUTPUTS, "align.pt", "tokenizer.*"))
    out.mkdir(parents=True, exist_ok=True)
    return identity


def training_pairs(model: SlideTextModel, cohort: AlignCohort, data: AlignDataConfig,
                   inputs: dict[str, Any], use_bags: bool, seed: int):  # fmt: skip
    """(slide–report pairs, training slide embeddings or None): bags when the encoder trains,
    else every training slide embedded once (z-scored per dim with ``data.standardize``)."""
    from slidefm.io.pairs import SlideReportPairs
    from slidefm.train.data import training_bags

    features, embeddings = inputs["features"], inputs["embeddings"]
    train_ids, train_emb = cohort.train_ids, None
    if use_bags:
        pairs_kw: dict[str, Any] = {"bags": training_bags(features, train_ids, data, seed)}
    else:
        log.info("embedding %d training slides once (frozen encoder)", len(train_ids))
        train_emb = slide_embeddings(
            model, train_ids, features, embeddings, max_tiles=data.eval_max_tiles, seed=seed
        )
        pairs_kw = {"embeddings": train_emb, "slide_ids": train_ids}
        if data.standardize:
            model.set_slide_stats(torch.from_numpy(train_emb))
    ds = SlideReportPairs(
        cohort.train_rows,
        cohort.train_reports,
        model.tokenize,
        seed=seed,
        sentence_dropout=data.sentence_dropout,
        shuffle_sentences=data.shuffle_sentences,
        **pairs_kw,
    )
    return ds, train_emb


def make_eval_fn(cohort: AlignCohort, data: AlignDataConfig, inputs: dict[str, Any],
                 use_bags: bool, seed: int):  # fmt: skip
    """eval_fn(model) → ``val_metrics`` on one slide per validation case; the embeddings are
    cached while the slide encoder is frozen."""
    features, embeddings = inputs["features"], inputs["embeddings"]
    val_ids, cache = cohort.val_ids, {}  # cache: {'z': [N_val, E_slide]}

    def eval_fn(m: SlideTextModel) -> dict[str, float]:
        if not val_ids:
            return {}
        if "z" not in cache or (use_bags and not m.encoder_frozen):
            z = slide_embeddings(
                m, val_ids, features, embeddings, max_tiles=data.eval_max_tiles, seed=seed
            )
            if m.encoder_frozen or embeddings is not None:
                cache["z"] = z
        else:
            z = cache["z"]
        return val_metrics(m, z, cohort.val_reports, labels=cohort.val_labels)

    return eval_fn


def save_align_checkpoint(
    out: Path,
    model: SlideTextModel,
    info: dict[str, Any],
    extra: dict[str, Any],
    cohort: AlignCohort,
    train_emb: np.ndarray | None,
    inputs: dict[str, Any],
    data: AlignDataConfig,
    seed: int,
) -> None:
    """``align.pt`` with its provenance, the patients it has seen (trained on, or selected its
    step on: zero-shot and retrieve warn when they score them) and its domain reference."""
    from slidefm.train.run_dir import save_final

    features, embeddings = inputs["features"], inputs["embeddings"]
    ref = domain_reference(model, train_emb, cohort.train_ids, cohort.val_ids, features,
                           embeddings, data.eval_max_tiles, seed)  # fmt: skip
    seen = {
        "train_case_ids": cohort.train_cases,
        "val_case_ids": cohort.val_cases,
        "train_slide_ids": cohort.train_ids,
        "val_slide_ids": cohort.val_ids,
    }
    extra = {**extra, **seen, "domain_reference": ref.to_dict()}
    info["domain_reference_calibrated_on"] = ref.calibrated_on
    save_final(out, info, model.save_checkpoint, "align.pt", "checkpoint", extra)


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
    flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Align and write the outputs listed in the module docstring; returns run info.

    ``out`` belongs to one (config, manifest rows + slide inputs + tokenizer, seed): another
    one is refused unless ``overwrite`` (see ``train.run_dir.claim_run_dir``). ``flags``:
    config values of explicit command-line options (``overrides`` beat them)."""
    from slidefm.io.pairs import collate_pairs
    from slidefm.train.data import make_loader
    from slidefm.train.run_dir import RUN_CONFIG, fit_run, write_json

    out = Path(out)
    cfg = load_run_config(config, overrides, flags)
    data, mcfg, tcfg = cfg.data, cfg.model, train_config(cfg.train, out, seed)
    cfgd = config_record(cfg)
    if (features is None) == (embeddings is None):
        raise ValueError("give exactly one of --features DIR or --embeddings H5")
    cohort = read_cohort(manifest, data)
    inputs = {"features": features, "embeddings": embeddings, "tokenizer": tokenizer}
    identity = claim_output(out, cfg, cohort, inputs, seed, overwrite)
    tok_path, tok_info = prepare_tokenizer(
        tokenizer, out, cohort.train_reports, data.tokenizer_vocab_size, seed
    )
    seed_everything(seed)  # a random:<config> encoder and the heads are drawn from the seed
    enc, enc_info = prepare_slide_encoder(
        cfg.slide_encoder, features, cohort.train_ids, cfg.slide_encoder_weights
    )
    tile_info, emb_dim, emb_random = input_info(features, embeddings, cohort.train_ids)
    if embeddings is not None:
        check_embeddings_input(enc, mcfg, embeddings, emb_random, enc_info)
    slide_dim = emb_dim if emb_dim is not None else int(enc.embed_dim)
    info: dict[str, Any] = {
        "config": cfgd,
        "config_name": config,
        "config_hash": config_hash({**cfgd, "tokenizer_sha256": tok_info["tokenizer_sha256"]}),
        "seed": seed,
        "identity": identity,
        **cohort_info(manifest, features, embeddings, cohort),
        **tok_info,
        **enc_info,
        **tile_info,
    }
    for note in random_weight_notes(info):
        log.warning("RANDOM WEIGHTS: %s", note)
    rank, world = dist_info()
    model = SlideTextModel(mcfg, slide_dim, tok_path, slide_encoder=enc)
    model.to(pick_device(tcfg.device) if world == 1 else torch.device("cpu"))
    if rank == 0:
        write_json(out / RUN_CONFIG, info)

    # Slides of training: precomputed embeddings (frozen encoder / H5) or bags (trainable).
    use_bags = features is not None and not (
        mcfg.slide_trainable == "frozen" and data.precompute_frozen
    )
    ds, train_emb = training_pairs(model, cohort, data, inputs, use_bags, seed)
    loader = make_loader(
        ds,
        data.batch_size,
        seed=seed,
        num_workers=data.num_workers,
        collate_fn=collate_pairs,
        drop_last=len(ds) >= 2 * data.batch_size * world,
    )
    eval_fn = make_eval_fn(cohort, data, inputs, use_bags, seed)
    title = f"slidefm align ({config}, seed {seed}): {out.name}"
    finished = fit_run(model, loader, tcfg, info, eval_fn, stop_at_step=stop_at_step, title=title)
    if rank == 0 and finished:
        extra = {**enc_info, **tok_info, **tile_info, "align_config": cfgd}
        ref_emb = train_emb if not use_bags else None
        save_align_checkpoint(out, model, info, extra, cohort, ref_emb, inputs, data, seed)
    return info
