"""Where a trained MIL model looks on one slide (``slidefm heatmap``, and the viewer's layer).

Per-tile scores (ABMIL attention, or gradient × input for models without attention) →
``<slide_id>_heatmap.png`` over the thumbnail (colour bar with the score's meaning and range,
title with the model, predicted class and probability, scale bar; ``normalize`` rank | raw |
minmax), ``<slide_id>_thumbnail.jpg``, ``<slide_id>_tiles.geojson`` for QuPath
(File › Import objects; tiles are detections coloured by score, with the score as a
measurement), ``<slide_id>_scores.csv`` and ``<slide_id>_heatmap.json`` (provenance).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidefm.runtime import pick_device, seed_everything

if TYPE_CHECKING:  # torch-based modules load inside the functions
    import torch

    from slidefm.io.features import SlideFeatures


def check_slide_matches(slide: str | Path, sf: SlideFeatures, features: str | Path) -> None:
    """Refuse to draw ``features`` over another slide than the one they were cut from: the
    level-0 size and file size recorded at encoding must match, and (foreign files without
    them) every tile must lie inside the slide."""
    from slidefm.wsi.reader import SlideReader

    with SlideReader(slide) as r:
        w, h = r.info.width, r.info.height
    a, problems = sf.attrs, []
    rec = (a.get("level0_width"), a.get("level0_height"))
    if all(rec) and (int(rec[0]), int(rec[1])) != (w, h):
        problems.append(f"it is {w}×{h} px at level 0, the encoded slide {rec[0]}×{rec[1]}")
    size, real = a.get("source_size"), Path(slide).stat().st_size
    if size and Path(slide).is_file() and int(size) != real:
        problems.append(f"it has {real} bytes, the encoded slide {size}")
    far = sf.coords.max(axis=0)
    if far[0] >= w or far[1] >= h:
        problems.append(f"tiles start at up to ({far[0]}, {far[1]}), outside its {w}×{h} px")
    if problems:
        src = a.get("source_path") or "unrecorded"
        raise ValueError(
            f"--slide {slide} is not the slide {features} was encoded from ({src}): "
            f"{'; '.join(problems)}"
        )


def score_slide(
    model: torch.nn.Module,
    meta: dict[str, Any],
    sf: SlideFeatures,
    target: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """One slide through a MIL model → {scores (N,), kind, class (index), classes,
    probabilities (C,)}. ``target`` (a class name) defaults to the predicted class. Shared by
    ``slidefm heatmap`` and the viewer so both show the same numbers."""
    import torch

    from slidefm.eval.heatmap import tile_scores

    if sf.features.shape[1] != meta["in_dim"]:
        raise ValueError(
            f"{sf.slide_id} holds {sf.features.shape[1]}-d features but the model expects {meta['in_dim']}-d; use features from the tile encoder it was trained on"
        )
    classes = list(meta["task"]["classes"])
    tgt = None
    if target is not None:
        if target not in classes:
            raise ValueError(
                f"--target {target!r} is not a class of this model; classes: {classes}"
            )
        tgt = classes.index(target)
    model = model.to(device)
    feats = torch.from_numpy(np.ascontiguousarray(sf.features, dtype=np.float32)).to(device)
    grid = torch.from_numpy(sf.grid.astype(np.int64)).to(device)
    scores, kind, cls = tile_scores(model, feats, grid, tgt)
    with torch.no_grad():
        logits = model(feats[None], grid[None])["logits"][0]
    prob = (
        (torch.sigmoid(logits) if meta["task"]["multilabel"] else torch.softmax(logits, -1))
        .cpu()
        .numpy()
    )
    return {"scores": scores, "kind": kind, "class": cls, "classes": classes, "probabilities": prob}


def score_label(kind: str, cls: str, mode: str) -> str:
    """What the colour bar measures, in words."""
    what = (
        "attention weight (share of the slide's prediction; sums to 1)"
        if kind == "attention"
        else f"gradient × input for {cls!r} (> 0 pushes towards it)"
    )
    if mode == "rank":
        return f"{what.split(' (')[0]}: percentile rank among this slide's tiles"
    if mode == "minmax":
        return f"{what.split(' (')[0]}, rescaled to [0, 1] (min → max)"
    return what


def slide_weights(meta: dict) -> str:
    enc = meta.get("slide_encoder") or {}
    return str(enc.get("weights", "")) if isinstance(enc, dict) else ""


def figure_title(sid: str, meta: dict, classes: list[str], cls: int, prob, kind: str) -> str:
    """``<slide>: <model> for <label> / predicted <class> (p = 0.93), showing …``."""
    label = "+".join(meta["task"].get("labels", [])) or "label"
    shown = "attention" if kind == "attention" else f"attribution to {classes[cls]!r}"
    return (
        f"{sid}: {meta.get('model', 'MIL')} model for {label}\n"
        f"predicted {classes[int(prob.argmax())]!r} (p = {prob.max():.2f}); "
        f"showing {shown} (p({classes[cls]}) = {prob[cls]:.2f})"
    )


@dataclasses.dataclass(frozen=True)
class HeatmapOptions:
    """How the heatmap is drawn and which class it explains."""

    target: str | None = None  # class to explain (default: the predicted class)
    normalize: str = "rank"  # rank | raw | minmax (colours)
    max_size: int = 1536  # thumbnail longer side, px
    alpha: float = 0.5  # heatmap opacity
    cmap: str | None = None  # matplotlib colormap (default: jet; coolwarm for signed raw)
    device: str = "auto"


def _tile_table(sf: SlideFeatures, scores: np.ndarray, disp: np.ndarray):
    import pandas as pd

    return pd.DataFrame(
        {
            "tile_index": np.arange(len(scores)),
            "x": sf.coords[:, 0],
            "y": sf.coords[:, 1],
            "col": sf.grid[:, 0],
            "row": sf.grid[:, 1],
            "score": scores,
            "score_display": disp,
        }
    )


def _figure(slide, sf, sid, meta, res, opts: HeatmapOptions, out: Path) -> dict[str, Path]:
    """The thumbnail JPEG and the heatmap PNG over it."""
    from PIL import Image

    from slidefm.eval.heatmap import heatmap_figure, slide_thumbnail, write_jpeg, write_png
    from slidefm.io.provenance import figure_note

    classes, cls, prob, kind = res["classes"], res["class"], res["probabilities"], res["kind"]
    thumb, scale = slide_thumbnail(slide, opts.max_size)
    paths = {"thumbnail": write_jpeg(Image.fromarray(thumb), out / f"{sid}_thumbnail.jpg")}
    fig = heatmap_figure(
        thumb,
        scale,
        sf.coords,
        float(sf.attrs["patch_size_level0"]),
        res["scores"],
        mode=opts.normalize,
        title=figure_title(sid, meta, classes, cls, prob, kind),
        score_label=score_label(kind, classes[cls], opts.normalize),
        level0_mpp=sf.attrs.get("level0_mpp"),
        note=figure_note(
            {
                "tile_encoder_weights": sf.attrs.get("encoder_weights"),
                "slide_encoder_weights": slide_weights(meta),
            }
        ),
        cmap=opts.cmap,
        alpha=opts.alpha,
    )
    paths["heatmap"] = write_png(fig, out / f"{sid}_heatmap.png")
    return paths


def write_heatmap(
    slide: str | Path | None,
    features: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    opts: HeatmapOptions = HeatmapOptions(),
    seed: int = 0,
) -> dict[str, Any]:
    """Score one slide with a MIL checkpoint and write the outputs of the module docstring
    (without ``slide`` only GeoJSON, CSV and JSON); returns the provenance written to
    ``<slide_id>_heatmap.json``."""
    from slidefm.eval.heatmap import display_range, tiles_geojson, write_geojson
    from slidefm.eval.report import write_csv, write_json
    from slidefm.io.features import check_encoder_matches, read_features
    from slidefm.io.manifest import check_slide_id
    from slidefm.models.mil import load_mil_checkpoint

    seed_everything(seed)
    sf = read_features(features)
    model, meta = load_mil_checkpoint(checkpoint)
    check_encoder_matches(features, sf.attrs, meta.get("features", {}), checkpoint)
    if slide:  # before any output: a grid over the wrong image is worse than none
        check_slide_matches(slide, sf, features)
    res = score_slide(model, meta, sf, opts.target, pick_device(opts.device))
    scores, kind, cls = res["scores"], res["kind"], res["class"]
    classes, prob = res["classes"], res["probabilities"]
    disp = display_range(scores, opts.normalize)[0]
    s = float(sf.attrs["patch_size_level0"])
    out = Path(out)
    sid = check_slide_id(sf.slide_id, f"{features} (attr slide_id)")
    name = f"{kind} ({classes[cls]})" if kind != "attention" else "attention"
    extra = {"slide_id": sid, "checkpoint": str(checkpoint), "score": kind, "class": classes[cls]}
    fc = tiles_geojson(sf.coords, s, scores, disp, name=name, extra=extra)
    paths = {"geojson": write_geojson(fc, out / f"{sid}_tiles.geojson")}
    paths["scores"] = write_csv(_tile_table(sf, scores, disp), out / f"{sid}_scores.csv")
    if slide:
        paths.update(_figure(slide, sf, sid, meta, res, opts, out))
    info = {
        "slide_id": sid,
        "slide": slide,
        "features": str(features),
        "checkpoint": str(checkpoint),
        "score": kind,
        "class": classes[cls],
        "probabilities": dict(zip(classes, map(float, prob))),
        "normalize": opts.normalize,
        "tile_encoder_weights": str(sf.attrs.get("encoder_weights", "unknown")),
        "patch_size_level0": s,
        "num_tiles": int(len(scores)),
        "seed": seed,
        "files": {k: str(v) for k, v in paths.items()},
    }
    write_json(info, out / f"{sid}_heatmap.json")
    return info
