"""``slidefm zero-shot``: classify slides from text prompts with an alignment checkpoint.

The command line of ``slidefm.eval.zero_shot_run.run_zero_shot`` (outputs described there).
"""

from __future__ import annotations

import argparse

from slidefm.options import add_input_args, add_run_args, run_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zero-shot", help="zero-shot slide classification from text prompts")
    add_input_args(p)
    p.add_argument(
        "--prompts", required=True, help="prompt YAML (path or name under configs/prompts)"
    )
    p.add_argument("--manifest", help="CSV with slide_id (+ case_id, labels, split)")
    p.add_argument("--label-column", help="manifest column with class names: adds metrics")
    p.add_argument("--split", help="only manifest rows of this split (e.g. test)")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.eval.zero_shot import format_metrics
    from slidefm.eval.zero_shot_run import run_zero_shot
    from slidefm.io.provenance import random_weight_notes

    res = run_zero_shot(
        args.checkpoint,
        args.prompts,
        args.out,
        manifest=args.manifest,
        label_column=args.label_column,
        split=args.split,
        **run_kwargs(args),
    )
    print(f"zero-shot on {len(res['slide_ids'])} slides → {args.out}/predictions.csv")
    if res["metrics"]:
        print("  " + format_metrics(res["metrics"]))
    if res.get("num_out_of_domain"):
        print(f"WARNING: {res['num_out_of_domain']} slide(s) out of the model's domain "
              "(out_of_domain in predictions.csv): their probabilities are not meaningful")  # fmt: skip
    for note in random_weight_notes(res):
        print(f"NOTE: {note}")
    return 0
