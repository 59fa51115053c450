"""``slidefm embed-slides``: tile-feature files → one slide embedding each, in one HDF5 file.

The command line of ``slidefm.eval.embed.run_embed`` (where the encoder comes from, how
random weights are recorded, what published encoders check).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed-slides", help="slide embeddings from tile-feature files with a slide encoder"
    )
    p.add_argument("--checkpoint", help="encoder checkpoint (e.g. <pretrain out>/encoder.pt)")
    p.add_argument("--config", help="slide-encoder config name/path, with --weights random")
    p.add_argument(
        "--model",
        help="registry slide encoder (`slidefm slide-encoders list`): gigapath, titan, chief, "
        "or a slidefm config; with --weights",
    )
    p.add_argument(
        "--weights",
        help="with --model: hub | PATH (file or snapshot folder) | random; with --config: random",
    )
    p.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--out", required=True, help="output HDF5, e.g. slide_embeddings.h5")
    p.add_argument("--manifest", help="CSV with slide_id: embed only these slides, in its order")
    p.add_argument("--max-tiles", type=int, default=None, help="random subset per slide")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0, help="seed (random weights, max-tiles subsets)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.eval.embed import run_embed
    from slidefm.io.manifest import read_manifest

    ids = None
    if args.manifest:
        ids = read_manifest(args.manifest)["slide_id"].astype(str).tolist()
    run_embed(
        args.features,
        args.out,
        checkpoint=args.checkpoint,
        config=args.config,
        weights=args.weights,
        slide_ids=ids,
        max_tiles=args.max_tiles,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        model=args.model,
    )
    return 0
