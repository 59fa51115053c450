"""``slidefm pretrain-tiles``: the command line (light: nothing heavy is imported until it
runs). The implementation is ``slidefm.train.tile_ssl``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common, add_overwrite

    p = sub.add_parser(
        "pretrain-tiles", help="DINOv2-style SSL of a tile encoder from WSIs (online patching)"
    )
    p.add_argument("inputs", nargs="*", help="slide files or folders")
    p.add_argument("--manifest", help="CSV with slide_id, path (optional mpp, split)")
    p.add_argument("--split", help="use only manifest rows with this split (e.g. train)")
    p.add_argument("--encoder", required=True, help="tile-encoder registry name")
    p.add_argument("--weights", default="random", help="random | hub | PATH (start point)")
    p.add_argument("--out", required=True, help="output folder (re-run the command to resume)")
    add_common(p, "pretrain_tiles")
    add_overwrite(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.runtime import dist_info
    from slidefm.train.tile_ssl import WEIGHTS_FILE, run_pretrain_tiles
    from slidefm.wsi.jobs import select_jobs

    jobs = select_jobs(args.inputs, args.manifest, args.split)
    info = run_pretrain_tiles(
        jobs,
        args.encoder,
        args.weights,
        args.out,
        args.config,
        args.overrides,
        args.seed,
        overwrite=args.overwrite,
    )
    if dist_info()[0] != 0:
        return 0
    final = info.get("final", {})
    te = info.get("tile_encoder")
    print(
        json.dumps(
            {
                "steps": info["steps"],
                "slides": len(info["slides"]),
                "skipped": len(info["skipped_slides"]),
                "source_weights": info["source_weights"],
                "step0": info.get("step0_eval"),
                "final": {k: v for k, v in final.items() if k in ("loss", "rankme", "odcorr")}
                | {k: v for k, v in final.items() if k.startswith("knn")},
                "tile_encoder": str(Path(args.out) / WEIGHTS_FILE) if te else None,
            }
        )
    )
    return 0
