"""``slidefm align``: contrastive slide ↔ report alignment on a cohort manifest.

The command line of ``slidefm.train.align.run_align`` (inputs, splits and outputs are
described there). Options: ``--config`` YAML < ``--slide-encoder`` < ``--set key=value``.
"""

from __future__ import annotations

import argparse

from slidefm.options import add_overwrite


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

    p = sub.add_parser("align", help="contrastive slide-report alignment (CLIP-style)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="folder of <slide_id>.h5 tile-feature files")
    src.add_argument("--embeddings", help="slide-embedding H5 from `slidefm embed-slides`")
    p.add_argument("--manifest", required=True, help="CSV: slide_id, case_id, split, report")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: train on train reports)")
    p.add_argument(
        "--slide-encoder",
        help="slide-encoder checkpoint (<pretrain out>/encoder.pt), random:<config>, or a "
        "published encoder (gigapath, titan, chief) with --slide-encoder-weights; overrides "
        "the config's slide_encoder",
    )
    p.add_argument(
        "--slide-encoder-weights",
        help="published --slide-encoder only: hub (HF cache) | PATH (published layout, e.g. "
        "<pretrain out>/slide_encoder.pth) | random",
    )
    p.add_argument("--out", required=True, help="output folder (re-run the command to resume)")
    add_overwrite(p)
    add_common(p, "align")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.config import flag_values
    from slidefm.io.provenance import random_weight_notes
    from slidefm.runtime import dist_info
    from slidefm.train.align import run_align

    if not args.config:
        raise ValueError("pass --config (e.g. tiny or titan_like under configs/align/)")
    info = run_align(
        args.config,
        args.manifest,
        args.out,
        features=args.features,
        embeddings=args.embeddings,
        tokenizer=args.tokenizer,
        overrides=args.overrides,
        seed=args.seed,
        overwrite=args.overwrite,
        flags=flag_values(args, ["slide_encoder", "slide_encoder_weights"]),
    )
    if dist_info()[0] != 0:
        return 0
    final = info.get("final", {})
    rnd = " (RANDOM slide encoder)" if info.get("slide_encoder_weights") == "random" else ""
    sel = info.get("selected")
    kept = final
    if sel and sel.get("restored"):
        kept = info.get("selected_metrics", final)
        chosen = (
            f"kept step {sel['step']} of {info['steps']} (best {sel['metric']} "
            f"{sel['value']:.4g}; last step's {final.get(sel['metric'], float('nan')):.4g})"
        )
    elif sel:
        chosen = f"kept the last step {info['steps']} ({sel['metric']} was never evaluated)"
    else:
        chosen = f"kept the last step {info['steps']}"
    print(
        f"aligned {info['steps']} steps on {info['num_train_cases']} training patients{rnd}; "
        f"{chosen}: loss {kept.get('loss', float('nan')):.4g}, val loss "
        f"{kept.get('val_loss', float('nan')):.4g}, val slide→report R@5 "
        f"{kept.get('val_s2r_recall@5', float('nan')):.3f}; "
        f"checkpoint: {info.get('checkpoint', 'not yet (stopped)')}"
    )
    for note in random_weight_notes(info):
        print(f"NOTE: {note}")
    return 0
