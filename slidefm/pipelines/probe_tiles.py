"""``slidefm probe-tiles``: the command line (light: nothing heavy is imported until it
runs). The implementation is ``slidefm.eval.tile_probes``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe-tiles", help="tile-level linear / kNN / few-shot probes")
    p.add_argument(
        "--features",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="encode-slides output folder (repeat to compare encoders)",
    )
    p.add_argument("--labels", required=True, help="CSV slide_id, x, y, <label> (e.g. cells.csv)")
    p.add_argument("--label-column", default="cell_type")
    p.add_argument("--manifest", required=True, help="CSV slide_id, case_id (and split)")
    p.add_argument("--splits", default="val,test", help="manifest splits to probe on")
    p.add_argument("--seeds", default="0,1,2", help="split seeds")
    p.add_argument("--shots", default="1,5,10")
    p.add_argument("--max-per-slide", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.eval.tile_probes import run_probe_tiles

    feats = {}
    for item in args.features:
        name, _, folder = item.rpartition("=")
        feats[name or Path(folder).name] = folder
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    table = run_probe_tiles(
        feats,
        args.labels,
        args.manifest,
        args.out,
        args.label_column,
        tuple(s for s in args.splits.split(",") if s),
        ints(args.seeds),
        ints(args.shots),
        args.max_per_slide,
    )
    summ = table.groupby(["encoder", "probe"], sort=False)["bacc"].agg(["mean", "std"]).round(3)
    print(summ.to_string())
    return 0
