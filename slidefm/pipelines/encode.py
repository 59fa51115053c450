"""``slidefm encode-slides``: slides → one ``<slide_id>.h5`` of tile features each.

Per-slide atomic outputs make the run resumable and shardable: a slide is skipped when its
complete file has the same config hash (options, seed, device type, effective precision) and
was made from the same source file (size + mtime); a failed slide is reported and the cohort
goes on. A folder belongs to one configuration: re-running with other options is refused
unless ``--overwrite`` is given. Each run leaves its own record under ``runs/<run_id>/``
(``errors.csv``, ``summary.json``); the top-level copies describe the latest run. A full or
read-only disk stops the run with one line naming the slide that was not written.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import slidefm
from slidefm.config import (
    ConfigError,
    apply_flags,
    apply_overrides,
    config_hash,
    from_dict,
    load_yaml,
    resolve_config_path,
)
from slidefm.io.atomic import atomic_path, clean_stale_tmp
from slidefm.runtime import (
    check_interrupted,
    dist_info,
    effective_precision,
    pick_device,
    seed_everything,
)
from slidefm.wsi.modes import BORDER_MODES, TISSUE_MODES
from slidefm.wsi.reader import SLIDE_EXTENSIONS, SlideReader, SlideReadError, slide_id_from_path

if TYPE_CHECKING:  # heavy modules load inside the functions (`slidefm --help` stays fast)
    from slidefm.wsi.tissue import TissueConfig

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
    "border_tiles",
)
# Allowed values of the options that take a word; checked when the config is built.
CHOICES = {
    "stain_norm": ("none", "macenko"),
    "feature_dtype": ("float32", "float16"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "border_tiles": BORDER_MODES,
}


class OutputError(RuntimeError):
    """The output folder cannot take the run (not a folder, not writable, full, other config)."""


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
    border_tiles: str = "pad"  # pad: keep partial edge tiles, filled with white | drop

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"encode option {name} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        positive = {
            "batch_size": self.batch_size,
            "patch_size": self.patch_size,
            "region_tiles": self.region_tiles,
            "target_mpp": self.target_mpp,
        }
        for name, v in positive.items():
            if not v > 0:
                raise ConfigError(f"encode option {name} must be > 0, got {v!r}")
        if self.num_workers < 0:
            raise ConfigError(f"encode option num_workers must be ≥ 0, got {self.num_workers}")
        if not 0 <= self.overlap < self.patch_size:
            raise ConfigError(
                f"encode option overlap must be in [0, patch_size={self.patch_size}), got {self.overlap}"
            )
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"encode option min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"encode option mpp must be > 0 µm/px, got {self.mpp}")
        if not self.max_upsample >= 1:
            raise ConfigError(f"encode option max_upsample must be ≥ 1, got {self.max_upsample}")
        self.tissue_config()  # unknown keys / bad tissue.mode fail here, before any slide

    def tissue_config(self) -> TissueConfig:
        from slidefm.wsi.tissue import TissueConfig

        try:
            return from_dict(
                TissueConfig,
                {k: tuple(v) if isinstance(v, list) else v for k, v in self.tissue.items()},
            )
        except ValueError as e:
            raise ConfigError(f"encode option tissue: {e}") from None


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
    note: str = ""  # e.g. a QC image that could not be written (features are complete)


# -- inputs ---------------------------------------------------------------------------------
def collect_slides(inputs: list[str], manifest: str | None = None) -> list[SlideJob]:
    """Slide files, folders (recursive, by extension) and/or a manifest → sorted, unique jobs."""
    import pandas as pd

    from slidefm.io.manifest import check_slide_id, read_manifest

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
        check_slide_id(j.slide_id, f"slide {j.path}")
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
def runtime_key(cfg: EncodeConfig) -> dict[str, str]:
    """Device type and the precision really used: both change the features' numbers."""
    device = pick_device(cfg.device)
    return {"device": device.type, "precision": effective_precision(device, cfg.precision)}


def slide_hash(
    cfg: EncodeConfig, job: SlideJob, seed: int, runtime: dict[str, str] | None = None
) -> str:
    d: dict[str, Any] = {k: getattr(cfg, k) for k in OUTPUT_FIELDS}
    d["mpp"] = job.mpp if job.mpp is not None else cfg.mpp
    d["seed"] = seed
    d.update(runtime if runtime is not None else runtime_key(cfg))
    return config_hash(d)


def source_stat(path: str | Path) -> dict[str, int]:
    """Size and mtime (ns) of a slide file (a folder slide: of the folder)."""
    st = Path(path).stat()
    return {
        "source_size": int(st.st_size) if Path(path).is_file() else 0,
        "source_mtime_ns": int(st.st_mtime_ns),
    }


def _source_unchanged(attrs: dict[str, Any], path: str) -> bool:
    try:
        now = source_stat(path)
    except OSError:
        return True  # the slide is gone: keep its complete features, nothing to compare
    return all(attrs.get(k) == v for k, v in now.items())


def _is_disk_error(e: BaseException) -> str | None:
    """'disk full' / 'read-only' when ``e`` is that kind of OSError (h5py hides the errno)."""
    if not isinstance(e, OSError):
        return None
    msg = str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in msg or "errno = 28" in msg:
        return "disk full"
    if e.errno == errno.EROFS or "Read-only file system" in msg:
        return "read-only file system"
    return None


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it takes a file, before any slide is read."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file, not a folder; pass a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / ".write-check") as tmp:
            tmp.write_bytes(b"ok")
        (out_dir / ".write-check").unlink()
    except OSError as e:
        raise OutputError(
            f"--out {out_dir} is not writable ({e.strerror or type(e).__name__}); "
            "choose a folder you can write to"
        ) from None


def _slide_view(reader: SlideReader, cfg: EncodeConfig):
    """(thumbnail, level-0 px per thumbnail px, tissue mask, modality) of an open slide."""
    from slidefm.wsi.tissue import detect_modality, slide_tissue_mask

    tcfg = cfg.tissue_config()
    thumb, mask, scale = slide_tissue_mask(reader, tcfg)
    return thumb, scale, mask, detect_modality(thumb, tcfg)


def _qc_thumb(reader: SlideReader, thumb: np.ndarray, scale: float):
    if max(thumb.shape[:2]) < QC_MIN_SIZE:  # small slides: a legible QC image
        return reader.thumbnail(QC_MIN_SIZE)
    return thumb, scale


def qc_path(out_dir: Path, slide_id: str) -> Path:
    return out_dir / "qc" / f"{slide_id}.png"


def regenerate_qc(job: SlideJob, cfg: EncodeConfig, out_dir: Path) -> None:
    """Redraw a lost QC PNG of a complete slide from its feature file and the slide."""
    from slidefm.io.features import read_features
    from slidefm.wsi.qc import QCInfo, save_qc
    from slidefm.wsi.tiling import TileGrid

    sf = read_features(out_dir / f"{job.slide_id}.h5")
    a = sf.attrs
    mpp_override = job.mpp if job.mpp is not None else cfg.mpp
    with SlideReader(job.path, mpp_override=mpp_override) as reader:
        thumb, scale, mask, modality = _slide_view(reader, cfg)
        qc_thumb, qc_scale = _qc_thumb(reader, thumb, scale)
    tiles = TileGrid(
        sf.coords,
        sf.grid,
        sf.tissue_fraction,
        int(a["patch_size"]),
        float(a["target_mpp"]),
        float(a["level0_mpp"]),
        float(a["extent_level0"]),
        int(a["stride_level0"]),
        int(a.get("overlap", 0)),
    )
    info = QCInfo(job.slide_id, float(a["level0_mpp"]), cfg.target_mpp, cfg.patch_size, modality)
    save_qc(qc_path(out_dir, job.slide_id), qc_thumb, mask, qc_scale, tiles, info)


def encode_slide(
    job: SlideJob, cfg: EncodeConfig, encoder: Any, out_dir: Path, seed: int, chash: str
) -> int:
    """Encode one slide to ``out_dir/<slide_id>.h5``; returns the number of tiles."""
    from slidefm.io.features import SlideFeatures, write_features
    from slidefm.wsi.patches import TileRegionDataset, iter_tile_batches, tile_loader
    from slidefm.wsi.qc import QCInfo, save_qc
    from slidefm.wsi.stain import macenko_normalize
    from slidefm.wsi.tiling import EmptyTissueError, make_tile_grid

    mpp_override = job.mpp if job.mpp is not None else cfg.mpp
    src = source_stat(job.path)
    with SlideReader(job.path, mpp_override=mpp_override) as reader:
        info, level0_mpp = reader.info, reader.mpp
        if level0_mpp > cfg.target_mpp * cfg.max_upsample:
            raise ValueError(
                f"{job.path}: level-0 resolution {level0_mpp:.4g} µm/px is coarser than target {cfg.target_mpp} µm/px; "
                "tiles would be upsampled. Use a larger --target-mpp, or --mpp if the metadata is wrong."
            )
        thumb, scale, mask, modality = _slide_view(reader, cfg)
        qc_thumb, qc_scale = _qc_thumb(reader, thumb, scale) if cfg.qc else (thumb, scale)
        qc_info = QCInfo(job.slide_id, level0_mpp, cfg.target_mpp, cfg.patch_size, modality)
        try:
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
                cfg.border_tiles,
            )
        except EmptyTissueError as e:
            if not cfg.qc:
                raise
            qpath = qc_path(out_dir, job.slide_id)
            note = f"no tissue found ({modality}, --tissue {cfg.tissue_config().mode})"
            save_qc(qpath, qc_thumb, mask, qc_scale, None, dataclasses.replace(qc_info, note=note))
            raise EmptyTissueError(f"{e} (QC image: {qpath})") from None
        level = reader.best_level_for_mpp(cfg.target_mpp)
        ds = info.level_downsamples[level]
    transform = macenko_normalize if cfg.stain_norm == "macenko" else None
    dataset = TileRegionDataset(
        job.path,
        tiles,
        level,
        ds,
        cfg.region_tiles,
        mpp_override,
        transform,
        min_regions=2 * max(1, cfg.num_workers),  # a small slide still feeds every worker
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
    if source_stat(job.path) != src:
        raise SlideReadError(f"{job.path}: the slide file changed while it was being encoded")
    attrs = {
        "source_path": str(Path(job.path).resolve()),
        **src,
        "source_integrity": info.integrity,
        "tissue_mode": modality,
        "border_tiles": cfg.border_tiles,
        "device": encoder.device.type,
        "precision": effective_precision(encoder.device, cfg.precision),
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
        # TRIDENT/CLAM convention magnification = 10 / µm-per-px: their readers cut
        # round(patch_size × level0_magnification / target_magnification) level-0 px, which
        # with these values is exactly our tile (not the objective power, a nominal label).
        "level0_magnification": 10.0 / level0_mpp,
        "target_magnification": 10.0 / cfg.target_mpp,
        "objective_power": float(info.objective_power or 0.0),
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
        save_qc(qc_path(out_dir, job.slide_id), qc_thumb, mask, qc_scale, tiles, qc_info)
    return len(tiles)


# -- cohort ---------------------------------------------------------------------------------
def run_encode(
    jobs: list[SlideJob],
    cfg: EncodeConfig,
    out_dir: str | Path,
    seed: int = 0,
    encoder: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[SlideResult]:
    """Encode ``jobs`` into ``out_dir``; never raises for a bad slide (see the results).

    Raises ``OutputError`` (before any slide) when ``out_dir`` is not a writable folder or
    holds features of another configuration without ``overwrite``, and (mid-run) when the
    disk fills or turns read-only: the message names the slide that was not written.
    """
    from tqdm import tqdm

    from slidefm.io.features import FeatureFileError, is_complete, read_attrs
    from slidefm.wsi.tiling import EmptyTissueError

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    stale = clean_stale_tmp(out_dir) + clean_stale_tmp(out_dir / "qc")
    if stale:
        log.info("removed %d temporary file(s) of an interrupted run", len(stale))
    seed_everything(seed)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    runtime = runtime_key(cfg)
    results: list[SlideResult] = []
    todo, other_config = [], []
    for job in jobs:
        chash = slide_hash(cfg, job, seed, runtime)
        h5 = out_dir / f"{job.slide_id}.h5"
        if is_complete(h5, chash) and _source_unchanged(read_attrs(h5), job.path):
            results.append(SlideResult(job.slide_id, job.path, "skipped"))
            if cfg.qc and not qc_path(out_dir, job.slide_id).is_file():
                try:
                    regenerate_qc(job, cfg, out_dir)
                    log.info("%s: QC image was missing; redrawn", job.slide_id)
                except (SlideReadError, FeatureFileError, ValueError, OSError, KeyError) as e:
                    results[-1].note = f"QC image missing and not redrawn: {e}"
            continue
        if is_complete(h5) and read_attrs(h5).get("config_hash") != chash:
            other_config.append(job.slide_id)
        elif is_complete(h5):
            log.info("%s: the slide file changed since it was encoded; re-encoding", job.slide_id)
        todo.append((job, chash))
    if other_config and not overwrite:
        raise OutputError(
            f"--out {out_dir} holds features of {len(other_config)} slide(s) made with other "
            f"options (e.g. {other_config[0]}); use a new --out for this configuration, or pass "
            "--overwrite to re-encode them there"
        )
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
        check_interrupted()  # a Ctrl-C lost in a DataLoader's shutdown stops before the next slide
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
            dt = time.perf_counter() - t0
            h5 = out_dir / f"{job.slide_id}.h5"
            disk = _is_disk_error(e) or _is_disk_error(e.__cause__)
            if is_complete(h5, chash):  # the features are written; only the QC image failed
                n = _num_tiles(h5)
                results.append(SlideResult(job.slide_id, job.path, "done", n, dt, "", f"QC: {e}"))
            else:
                results.append(
                    SlideResult(job.slide_id, job.path, "failed", 0, dt, f"{type(e).__name__}: {e}")
                )
            if disk:
                _abort_on_disk_error(out_dir, results, cfg, seed, run_id, job, disk)
            log.warning("%s %s: %s", job.slide_id, results[-1].status, e)
            continue
        dt = time.perf_counter() - t0
        total_tiles += n
        results.append(SlideResult(job.slide_id, job.path, "done", n, dt))
        bar.set_postfix(
            tiles=total_tiles, tiles_per_s=f"{total_tiles / (time.perf_counter() - t_start):.1f}"
        )
    try:
        _write_reports(out_dir, results, cfg, seed, run_id)
    except OSError as e:
        kind = _is_disk_error(e) or "write error"
        raise OutputError(
            f"{kind} while writing the run report to {out_dir}: every slide listed as done "
            f"is complete; free space and re-run to get errors.csv/summary.json ({e})"
        ) from None
    return results


def _num_tiles(h5: Path) -> int:
    import h5py

    with h5py.File(h5, "r") as f:
        return int(f["coords"].shape[0])


def _abort_on_disk_error(
    out_dir: Path,
    results: list[SlideResult],
    cfg: EncodeConfig,
    seed: int,
    run_id: str,
    job: SlideJob,
    kind: str,
) -> None:
    """Stop the run: later slides would fail the same way (and HDF5 gets into odd states)."""
    done = sum(r.status == "done" for r in results)
    lost = results[-1].status == "failed"
    try:
        _write_reports(out_dir, results, cfg, seed, run_id)
        report = "errors.csv lists it"
    except OSError:
        report = "no report could be written"
    what = (
        f"slide {job.slide_id} was NOT written (no partial file under its name)"
        if lost
        else f"slide {job.slide_id}'s features are complete but its QC image is not"
    )
    raise OutputError(
        f"{kind} in {out_dir}: {what}; {done} slide(s) of this run are complete ({report}). "
        "Free space and re-run the same command: complete slides are skipped."
    )


def _write_reports(
    out_dir: Path, results: list[SlideResult], cfg: EncodeConfig, seed: int, run_id: str = ""
) -> None:
    """errors.csv + summary.json of this run under runs/<run_id>/ (kept), then as the
    top-level 'latest run' copies."""
    import pandas as pd

    rank, world = dist_info()
    suffix = f".rank{rank}" if world > 1 else ""
    failed = [r for r in results if r.status == "failed"]
    summary = {
        "run_id": run_id,
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(failed),
        "tiles": sum(r.tiles for r in results),
        "seconds": round(sum(r.seconds for r in results), 3),
        "notes": {r.slide_id: r.note for r in results if r.note},
        "config": dataclasses.asdict(cfg),
        "runtime": runtime_key(cfg),
        "seed": seed,
        "slidefm_version": slidefm.__version__,
        "history": "runs/<run_id>/ keeps every run's errors.csv and summary.json",
    }
    cols = ["slide_id", "path", "status", "tiles", "seconds", "error", "note"]
    errors = pd.DataFrame([dataclasses.asdict(r) for r in failed], columns=cols)
    errors.insert(0, "run_id", run_id)
    folders = [out_dir / "runs" / run_id, out_dir] if run_id else [out_dir]
    for folder in folders:
        with atomic_path(folder / f"errors{suffix}.csv") as tmp:
            errors.to_csv(tmp, index=False)
        with atomic_path(folder / f"summary{suffix}.json") as tmp:
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
    "border_tiles": str,
}


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (≥ 1), got {v}")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

    p = sub.add_parser("encode-slides", help="tile slides and embed tiles → one HDF5 per slide")
    p.add_argument("inputs", nargs="*", help="slide files and/or folders (searched recursively)")
    p.add_argument("--manifest", help="CSV with slide_id, path (optional mpp column)")
    p.add_argument("--out", required=True, help="output folder for <slide_id>.h5, qc/, errors.csv")
    for name, typ in FLAG_TO_FIELD.items():
        kw: dict[str, Any] = {"type": typ}
        if name in CHOICES:
            kw["choices"] = CHOICES[name]
        if name == "batch_size":
            kw["type"] = _positive_int
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"config {name}" + (f" ({' | '.join(CHOICES[name])})" if name in CHOICES else ""),
            **kw,
        )
    p.add_argument(
        "--tissue",
        choices=TISSUE_MODES,
        default=None,
        help="tissue detection: brightfield (H&E/IHC), fluorescence (signal on dark), "
        "auto (from the thumbnail's background; default). Config: tissue.mode",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="re-encode slides whose files in --out were made with other options",
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
    if getattr(args, "tissue", None):
        base["tissue"] = {**(base.get("tissue") or {}), "mode": args.tissue}
    if getattr(args, "no_qc", False):
        base["qc"] = False
    return from_dict(EncodeConfig, apply_overrides(base, args.overrides))


def run(args: argparse.Namespace) -> int:
    import torch

    cfg = config_from_args(args)
    jobs = collect_slides(args.inputs, args.manifest)
    rank, world = dist_info()
    num_shards = args.num_shards if args.num_shards is not None else world
    shard_index = args.shard_index if args.shard_index is not None else rank
    if world > 1 and torch.cuda.is_available() and cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    jobs = shard(jobs, num_shards, shard_index)
    results = run_encode(
        jobs,
        cfg,
        args.out,
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=getattr(args, "overwrite", False),
    )
    print_summary(results)
    return 1 if any(r.status == "failed" for r in results) else 0
