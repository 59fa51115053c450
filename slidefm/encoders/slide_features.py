"""One slide → its ``<slide_id>.h5`` of tile features (and its QC image): tissue mask, tile
grid, batched tile embedding, the provenance attrs of the feature-file schema, atomic write."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

import slidefm
from slidefm.encoders.encode_config import EncodeConfig
from slidefm.runtime import effective_precision
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.reader import SlideReader, SlideReadError

QC_MIN_SIZE = 1024  # px, longer side of the QC image


def source_stat(path: str | Path) -> dict[str, int]:
    """Size and mtime (ns) of a slide file (a folder slide: of the folder)."""
    st = Path(path).stat()
    return {
        "source_size": int(st.st_size) if Path(path).is_file() else 0,
        "source_mtime_ns": int(st.st_mtime_ns),
    }


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


def embed_tiles(
    job: SlideJob,
    cfg: EncodeConfig,
    encoder: Any,
    tiles: Any,
    level: int,
    downsample: float,
    mpp_override: float | None,
) -> np.ndarray:
    """Features [N_tiles, D] float32 of every tile of ``tiles``, read at ``level`` in regions
    by ``cfg.num_workers`` processes and embedded in batches of ``cfg.batch_size``."""
    from slidefm.wsi.patches import TileRegionDataset, iter_tile_batches, tile_loader
    from slidefm.wsi.stain import macenko_normalize

    transform = macenko_normalize if cfg.stain_norm == "macenko" else None
    dataset = TileRegionDataset(
        job.path,
        tiles,
        level,
        downsample,
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
    return feats


def feature_attrs(
    job: SlideJob,
    cfg: EncodeConfig,
    encoder: Any,
    src: dict[str, int],
    info: Any,
    geometry: dict[str, Any],
    chash: str,
    seed: int,
) -> dict[str, Any]:
    """The root attrs of a slide's feature file (schema in ARCHITECTURE.md): source identity,
    resolution and geometry, encoder and its weights, options, config hash, seed.
    ``geometry``: tiles (``TileGrid``), level0_mpp, level (read), modality."""
    tiles, level0_mpp = geometry["tiles"], geometry["level0_mpp"]
    level, modality = geometry["level"], geometry["modality"]
    return {
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


def encode_slide(
    job: SlideJob, cfg: EncodeConfig, encoder: Any, out_dir: Path, seed: int, chash: str
) -> int:
    """Encode one slide to ``out_dir/<slide_id>.h5``; returns the number of tiles."""
    from slidefm.io.features import SlideFeatures, write_features
    from slidefm.wsi.qc import QCInfo, save_qc
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
    feats = embed_tiles(job, cfg, encoder, tiles, level, ds, mpp_override)
    if source_stat(job.path) != src:
        raise SlideReadError(f"{job.path}: the slide file changed while it was being encoded")
    geometry = {"tiles": tiles, "level0_mpp": level0_mpp, "level": level, "modality": modality}
    attrs = feature_attrs(job, cfg, encoder, src, info, geometry, chash, seed)
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
