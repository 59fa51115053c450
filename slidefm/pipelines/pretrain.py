"""``slidefm pretrain``: masked-feature-modeling pretraining of a slide encoder on feature files.

The command line of ``slidefm.train.pretrain.run_pretrain`` (outputs described there).
Options: ``--config`` YAML < ``--set key=value``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common, add_overwrite

    p = sub.add_parser("pretrain", help="masked-feature-modeling pretraining of a slide encoder")
    p.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--out", required=True, help="output folder (re-run the command to resume)")
    p.add_argument("--manifest", help="CSV with slide_id (and split): restricts the slides")
    p.add_argument(
        "--split", default="train", help="manifest split used for pretraining (default train)"
    )
    add_overwrite(p)
    add_common(p, "pretrain")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.io.provenance import random_weight_notes
    from slidefm.runtime import dist_info
    from slidefm.train.pretrain import run_pretrain

    if not args.config:
        raise ValueError("pass --config (e.g. tiny or titan_like under configs/pretrain/)")
    info = run_pretrain(
        args.config,
        args.features,
        args.out,
        args.overrides,
        args.seed,
        manifest=args.manifest,
        split=args.split,
        overwrite=args.overwrite,
    )
    final = info.get("final", {})
    if dist_info()[0] != 0:
        return 0
    print(
        f"pretrained {info['steps']} steps on {info['num_train_slides']} slides: "
        f"loss {final.get('loss', float('nan')):.4g}, RankMe {final.get('rankme', float('nan')):.3g}"
        f" ({info['rankme_on']}); encoder: "
        f"{info.get('encoder_checkpoint') or info.get('encoder_weights') or 'not yet (stopped)'}"
    )
    if "use_with" in info:
        print(f"published layout; use it as the downloaded weights: {info['use_with']}")
    for note in random_weight_notes(info):
        print(f"NOTE: {note}")
    return 0
