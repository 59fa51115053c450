"""``slidefm encode-slides``: slides → one ``<slide_id>.h5`` of tile features each.

Per-slide atomic outputs make the run resumable and shardable: a slide is skipped when its
complete file has the same config hash, a failed slide is reported and the cohort goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import slidefm
from slidefm.config import (
    apply_flags,
    apply_overrides,
    config_hash,
    from_dict,
    load_yaml,
    resolve_config_path,
)
from slidefm.io.atomic import atomic_path, clean_stale_tmp
from slidefm.io.features import FeatureFileError, SlideFeatures, is_complete, write_features
from slidefm.io.manifest import read_manifest
from slidefm.runtime import dist_info, pick_device, seed_everything
from slidefm.wsi.patches import TileRegionDataset, iter_tile_batches, tile_loader
from slidefm.wsi.qc import save_qc
from slidefm.wsi.reader import SLIDE_EXTENSIONS, SlideReader, SlideReadError, slide_id_from_path
from slidefm.wsi.stain import macenko_normalize
from slidefm.wsi.tiling import EmptyTissueError, make_tile_grid
from slidefm.wsi.tissue import TissueConfig, slide_tissue_mask

log = logging.getLogger(__name__)
QC_MIN_SIZE = 1024  # px, longer side of the QC image

# Fields that change the numbers in an output file (and so its config hash).
OUTPUT_FIELDS = (
    "encoder",
    "weights",
    "target_mpp",
    "patch_size",
    "overlap",
    "min_tissue",
    "mpp",
    "stain_norm",
    "feature_dtype",
    "tissue",
)


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    encoder: str = "uni"
    weights: str = "hub"
    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.1
    mpp: float | None = None
    stain_norm: str = "none"
    feature_dtype: str = "float32"
    batch_size: int = 64
    num_workers: int = 2
    region_tiles: int = 8
    device: str = "auto"
    precision: str = "auto"
    qc: bool = True
    max_upsample: float = 1.1
    tissue: dict = dataclasses.field(default_factory=dict)

    def tissue_config(self) -> TissueConfig:
        return from_dict(
            TissueConfig,
            {k: tuple(v) if isinstance(v, list) else v for k, v in self.tissue.items()},
        )


@dataclasses.dataclass
class SlideJob:
    slide_id: str
    path: str
    mpp: float | None = None


@dataclasses.dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str  # done | skipped | failed
    tiles: int = 0
    seconds: float = 0.0
    error: str = ""


# -- inputs ---------------------------------------------------------------------------------
def collect_slides(inputs: list[str], manifest: str | None = None) -> list[SlideJob]:
    """Slide files, folders (recursive, by extension) and/or a manifest → sorted, unique jobs."""
    jobs: list[SlideJob] = []
    if manifest:
        df = read_manifest(manifest, required=("slide_id", "path"))
        for row in df.itertuples(index=False):
            mpp = getattr(row, "mpp", None)
            jobs.append(
                SlideJob(
                    str(row.slide_id),
                    str(row.path),
                    float(mpp) if mpp is not None and pd.notna(mpp) else None,
                )
            )
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # DICOM series span several files of one folder: scan them only when named explicitly.
            found = sorted(
                q
                for q in p.rglob("*")
                if q.is_file()
                and q.suffix.lower() in SLIDE_EXTENSIONS
                and q.suffix.lower() != ".dcm"
            )
            jobs.extend(SlideJob(slide_id_from_path(q), str(q)) for q in found)
        elif p.exists():
            jobs.append(SlideJob(slide_id_from_path(p), str(p)))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not jobs:
        raise ValueError("no slides found: pass slide files, folders or --manifest CSV")
    seen: dict[str, str] = {}
    for j in jobs:
        if j.slide_id in seen and seen[j.slide_id] != j.path:
            raise ValueError(
                f"slide_id {j.slide_id!r} names two files: {seen[j.slide_id]} and {j.path}; rename one or use a manifest"
            )
        seen[j.slide_id] = j.path
    uniq = {j.slide_id: j for j in jobs}
    return [uniq[k] for k in sorted(uniq)]


def shard(jobs: list[SlideJob], num_shards: int, shard_index: int) -> list[SlideJob]:
    """Every ``num_shards``-th slide starting at ``shard_index`` (slides are sorted by id)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    return jobs[shard_index::num_shards]


# -- one slide ------------------------------------------------------------------------------
def slide_hash(cfg: EncodeConfig, job: SlideJob, seed: int) -> str:
    d = {k: getattr(cfg, k) for k in OUTPUT_FIELDS}
    d["mpp"] = job.mpp if job.mpp is not None else cfg.mpp
    d["seed"] = seed
    return config_hash(d)


def encode_slide(
    job: SlideJob, cfg: EncodeConfig, encoder: Any, out_dir: Path, seed: int, chash: str
) -> int:
    """Encode one slide to ``out_dir/<slide_id>.h5``; returns the number of tiles."""
    mpp_override = job.mpp if job.mpp is not None else cfg.mpp
    with SlideReader(job.path, mpp_override=mpp_override) as reader:
        info, level0_mpp = reader.info, reader.mpp
        if level0_mpp > cfg.target_mpp * cfg.max_upsample:
            raise ValueError(
                f"{job.path}: level-0 resolution {level0_mpp:.4g} µm/px is coarser than target {cfg.target_mpp} µm/px; "
                "tiles would be upsampled. Use a larger --target-mpp, or --mpp if the metadata is wrong."
            )
        thumb, mask, scale = slide_tissue_mask(reader, cfg.tissue_config())
        tiles = make_tile_grid(
            info.width,
            info.height,
            level0_mpp,
            mask,
            scale,
            cfg.target_mpp,
            cfg.patch_size,
            cfg.overlap,
            cfg.min_tissue,
        )
        level = reader.best_level_for_mpp(cfg.target_mpp)
        ds = info.level_downsamples[level]
        if cfg.qc and max(thumb.shape[:2]) < QC_MIN_SIZE:  # small slides: a legible QC image
            qc_thumb, qc_scale = reader.thumbnail(QC_MIN_SIZE)
        else:
            qc_thumb, qc_scale = thumb, scale
    transform = macenko_normalize if cfg.stain_norm == "macenko" else None
    dataset = TileRegionDataset(
        job.path, tiles, level, ds, cfg.region_tiles, mpp_override, transform
    )
    device = encoder.device
    loader = tile_loader(dataset, cfg.num_workers, pin_memory=device.type == "cuda")
    feats = np.zeros((len(tiles), encoder.embed_dim), dtype=np.float32)
    filled = np.zeros(len(tiles), dtype=bool)
    for idx, batch in iter_tile_batches(loader, cfg.batch_size):
        out = encoder(batch.to(device, non_blocking=True))
        feats[idx.numpy()] = out.float().cpu().numpy()
        filled[idx.numpy()] = True
    if not filled.all():
        raise RuntimeError(f"{job.slide_id}: {int((~filled).sum())} tiles were never encoded")
    attrs = {
        "source_path": str(Path(job.path).resolve()),
        "source_size": Path(job.path).stat().st_size if Path(job.path).is_file() else 0,
        "encoder": cfg.encoder,
        "encoder_weights": encoder.weights_id,
        "target_mpp": float(cfg.target_mpp),
        "patch_size": int(cfg.patch_size),
        "patch_size_level0": int(tiles.patch_size_level0),
        "extent_level0": float(tiles.extent_level0),
        "stride_level0": int(tiles.stride_level0),
        "level0_mpp": float(level0_mpp),
        "mpp_source": info.mpp_source,
        "read_level": int(level),
        "level0_width": int(info.width),
        "level0_height": int(info.height),
        "level0_magnification": float(info.objective_power or round(10.0 / level0_mpp, 3)),
        "target_magnification": round(10.0 / cfg.target_mpp, 3),
        "overlap": int(cfg.overlap),
        "stain_norm": cfg.stain_norm,
        "vendor": info.vendor,
        "config_hash": chash,
        "slidefm_version": slidefm.__version__,
        "seed": int(seed),
    }
    sf = SlideFeatures(
        job.slide_id,
        feats.astype(cfg.feature_dtype),
        tiles.coords,
        tiles.grid,
        tiles.tissue_fraction,
        attrs,
    )
    write_features(out_dir / f"{job.slide_id}.h5", sf)
    if cfg.qc:
        save_qc(out_dir / "qc" / f"{job.slide_id}.png", qc_thumb, mask, qc_scale, tiles)
    return len(tiles)


# -- cohort ---------------------------------------------------------------------------------
def run_encode(
    jobs: list[SlideJob],
    cfg: EncodeConfig,
    out_dir: str | Path,
    seed: int = 0,
    encoder: Any = None,
    progress: bool = True,
) -> list[SlideResult]:
    """Encode ``jobs`` into ``out_dir``; never raises for a bad slide (see the results)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = clean_stale_tmp(out_dir) + clean_stale_tmp(out_dir / "qc")
    if stale:
        log.info("removed %d temporary file(s) of an interrupted run", len(stale))
    seed_everything(seed)
    results: list[SlideResult] = []
    todo = []
    for job in jobs:
        chash = slide_hash(cfg, job, seed)
        if is_complete(out_dir / f"{job.slide_id}.h5", chash):
            results.append(SlideResult(job.slide_id, job.path, "skipped"))
        else:
            todo.append((job, chash))
    if todo and encoder is None:
        from slidefm.encoders.tile import TileEncoder

        encoder = TileEncoder.create(
            cfg.encoder,
            weights=cfg.weights,
            device=str(pick_device(cfg.device)),
            precision=cfg.precision,
        )
    if encoder is not None and getattr(encoder, "is_random", False):
        print(
            f"WARNING: tile encoder {cfg.encoder!r} has RANDOM weights (--weights random): "
            "features are for smoke tests only, not pretrained results.",
            file=sys.stderr,
        )
    total_tiles, t_start = 0, time.perf_counter()
    bar = tqdm(todo, desc="slides", unit="slide", disable=not progress)
    for job, chash in bar:
        t0 = time.perf_counter()
        try:
            n = encode_slide(job, cfg, encoder, out_dir, seed, chash)
        except (
            SlideReadError,
            EmptyTissueError,
            FeatureFileError,
            ValueError,
            OSError,
            RuntimeError,
        ) as e:
            results.append(
                SlideResult(
                    job.slide_id,
                    job.path,
                    "failed",
                    0,
                    time.perf_counter() - t0,
                    f"{type(e).__name__}: {e}",
                )
            )
            log.warning("%s failed: %s", job.slide_id, e)
            continue
        dt = time.perf_counter() - t0
        total_tiles += n
        results.append(SlideResult(job.slide_id, job.path, "done", n, dt))
        bar.set_postfix(
            tiles=total_tiles, tiles_per_s=f"{total_tiles / (time.perf_counter() - t_start):.1f}"
        )
    _write_reports(out_dir, results, cfg, seed)
    return results


def _write_reports(out_dir: Path, results: list[SlideResult], cfg: EncodeConfig, seed: int) -> None:
    rank, world = dist_info()
    suffix = f".rank{rank}" if world > 1 else ""
    failed = [r for r in results if r.status == "failed"]
    with atomic_path(out_dir / f"errors{suffix}.csv") as tmp:
        pd.DataFrame(
            [dataclasses.asdict(r) for r in failed],
            columns=["slide_id", "path", "status", "tiles", "seconds", "error"],
        ).to_csv(tmp, index=False)
    summary = {
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(failed),
        "tiles": sum(r.tiles for r in results),
        "seconds": round(sum(r.seconds for r in results), 3),
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "slidefm_version": slidefm.__version__,
    }
    with atomic_path(out_dir / f"summary{suffix}.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))


def print_summary(results: list[SlideResult], file=None) -> None:
    """A small table: counts, tiles, time, then one line per failed slide."""
    file = file or sys.stdout
    done = [r for r in results if r.status == "done"]
    secs = sum(r.seconds for r in done)
    tiles = sum(r.tiles for r in done)
    rows = [
        ("slides done", len(done)),
        ("slides skipped (complete)", sum(r.status == "skipped" for r in results)),
        ("slides failed", sum(r.status == "failed" for r in results)),
        ("tiles encoded", tiles),
        ("time (s)", f"{secs:.1f}"),
        ("tiles/s", f"{tiles / secs:.1f}" if secs else "-"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), file=file)
    for r in results:
        if r.status == "failed":
            print(f"FAILED {r.slide_id}: {r.error}", file=file)


# -- CLI ------------------------------------------------------------------------------------
FLAG_TO_FIELD = {
    "encoder": str,
    "weights": str,
    "target_mpp": float,
    "patch_size": int,
    "overlap": int,
    "min_tissue": float,
    "mpp": float,
    "stain_norm": str,
    "batch_size": int,
    "num_workers": int,
    "device": str,
    "precision": str,
    "feature_dtype": str,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.cli import add_common

    p = sub.add_parser("encode-slides", help="tile slides and embed tiles → one HDF5 per slide")
    p.add_argument("inputs", nargs="*", help="slide files and/or folders (searched recursively)")
    p.add_argument("--manifest", help="CSV with slide_id, path (optional mpp column)")
    p.add_argument("--out", required=True, help="output folder for <slide_id>.h5, qc/, errors.csv")
    for name, typ in FLAG_TO_FIELD.items():
        p.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=f"config {name}"
        )
    p.add_argument("--no-qc", action="store_true", help="skip QC thumbnails")
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="split the cohort into N shards (default: torchrun world size)",
    )
    p.add_argument("--shard-index", type=int, default=None, help="which shard this process runs")
    p.add_argument("--no-progress", action="store_true")
    add_common(p, "encode")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    base = load_yaml(resolve_config_path(args.config, "encode")) if args.config else {}
    base = apply_flags(base, args, FLAG_TO_FIELD)
    if getattr(args, "no_qc", False):
        base["qc"] = False
    return from_dict(EncodeConfig, apply_overrides(base, args.overrides))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    jobs = collect_slides(args.inputs, args.manifest)
    rank, world = dist_info()
    num_shards = args.num_shards if args.num_shards is not None else world
    shard_index = args.shard_index if args.shard_index is not None else rank
    if world > 1 and torch.cuda.is_available() and cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    jobs = shard(jobs, num_shards, shard_index)
    results = run_encode(jobs, cfg, args.out, seed=args.seed, progress=not args.no_progress)
    print_summary(results)
    return 1 if any(r.status == "failed" for r in results) else 0
