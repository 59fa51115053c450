"""``slidefm heatmap``: where a trained MIL model looks on one slide.

The command line of ``slidefm.eval.heatmap_slide.write_heatmap`` (outputs described there).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from slidefm.eval.heatmap_slide import HeatmapOptions, write_heatmap

    opts = HeatmapOptions(args.target, args.normalize, args.max_size, args.alpha, args.cmap,
                          args.device)  # fmt: skip
    info = write_heatmap(args.slide, args.features, args.checkpoint, args.out, opts, args.seed)
    p = info["probabilities"][info["class"]]
    print(
        f"{info['slide_id']}: {info['score']} for class {info['class']!r} (p={p:.3f}) over "
        f"{info['num_tiles']} tiles → {args.out}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

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
        choices=["rank", "raw", "minmax"],
        default="rank",
        help="colours: percentile rank among the slide's tiles (default), the raw scores "
        "(colour bar in score units; signed scores centred on 0), or raw rescaled to [0, 1]",
    )
    p.add_argument(
        "--max-size", type=int, default=1536, help="thumbnail longer side in pixels (1536)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    p.add_argument(
        "--cmap", default=None, help="matplotlib colormap (default: jet; coolwarm for signed raw)"
    )
    p.add_argument("--device", default="auto")
    add_common(p)
    p.set_defaults(func=run)
