"""``slidefm heatmap``: where a trained MIL model looks on one slide.

Per-tile scores (ABMIL attention, or gradient × input for models without attention) →
``<slide_id>_heatmap.png`` over the thumbnail, ``<slide_id>_tiles.geojson`` for QuPath
(File › Import objects; tiles are detections coloured by score, with the score as a
measurement), ``<slide_id>_scores.csv`` and ``<slide_id>_heatmap.json`` (provenance).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from slidefm.eval.heatmap import (
    normalize_scores,
    render_heatmap,
    slide_thumbnail,
    tile_scores,
    tiles_geojson,
    write_geojson,
    write_png,
)
from slidefm.eval.report import write_csv, write_json
from slidefm.io.features import SlideFeatures, check_encoder_matches, read_features
from slidefm.io.manifest import check_slide_id
from slidefm.models.mil import load_mil_checkpoint
from slidefm.runtime import pick_device, seed_everything


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


def run(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    sf = read_features(args.features)
    model, meta = load_mil_checkpoint(args.checkpoint)
    check_encoder_matches(args.features, sf.attrs, meta.get("features", {}), args.checkpoint)
    if args.slide:  # before any output: a grid over the wrong image is worse than none
        check_slide_matches(args.slide, sf, args.features)
    res = score_slide(model, meta, sf, args.target, pick_device(args.device))
    scores, kind, cls = res["scores"], res["kind"], res["class"]
    classes, prob = res["classes"], res["probabilities"]
    disp = normalize_scores(scores, args.normalize)
    s = float(sf.attrs["patch_size_level0"])
    out = Path(args.out)
    sid = check_slide_id(sf.slide_id, f"{args.features} (attr slide_id)")
    name = f"{kind} ({classes[cls]})" if kind != "attention" else "attention"
    fc = tiles_geojson(
        sf.coords,
        s,
        scores,
        disp,
        name=name,
        extra={
            "slide_id": sid,
            "checkpoint": str(args.checkpoint),
            "score": kind,
            "class": classes[cls],
        },
    )
    paths = {"geojson": write_geojson(fc, out / f"{sid}_tiles.geojson")}
    scores_df = pd.DataFrame(
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
    paths["scores"] = write_csv(scores_df, out / f"{sid}_scores.csv")
    if args.slide:
        thumb, scale = slide_thumbnail(args.slide, args.max_size)
        paths["thumbnail"] = write_png(Image.fromarray(thumb), out / f"{sid}_thumbnail.png")
        paths["heatmap"] = write_png(
            render_heatmap(thumb, scale, sf.coords, s, disp, alpha=args.alpha, cmap=args.cmap),
            out / f"{sid}_heatmap.png",
        )
    info = {
        "slide_id": sid,
        "slide": args.slide,
        "features": str(args.features),
        "checkpoint": str(args.checkpoint),
        "score": kind,
        "class": classes[cls],
        "probabilities": dict(zip(classes, map(float, prob))),
        "normalize": args.normalize,
        "patch_size_level0": s,
        "num_tiles": int(len(scores)),
        "seed": args.seed,
        "files": {k: str(v) for k, v in paths.items()},
    }
    write_json(info, out / f"{sid}_heatmap.json")
    print(
        f"{sid}: {kind} for class {classes[cls]!r} (p={prob[cls]:.3f}) over {len(scores)} tiles → {out}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.cli import add_common

    p = sub.add_parser(
        "heatmap", help="per-tile attention/attribution → PNG over the thumbnail + QuPath GeoJSON"
    )
    p.add_argument(
        "--slide", help="the slide file (for the PNG; without it only GeoJSON/CSV are written)"
    )
    p.add_argument("--features", required=True, help="the slide's <slide_id>.h5 feature file")
    p.add_argument("--checkpoint", required=True, help="model.pt written by `slidefm mil train`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target", help="class to explain (default: the predicted class)")
    p.add_argument(
        "--normalize",
        choices=["rank", "minmax"],
        default="rank",
        help="display scaling (default: percentile rank)",
    )
    p.add_argument("--max-size", type=int, default=2048, help="thumbnail longer side in pixels")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap")
    p.add_argument("--device", default="auto")
    add_common(p)
    p.set_defaults(func=run)
