"""``slidefm retrieve``: slide↔report and slide→slide retrieval with an alignment checkpoint.

The command line of ``slidefm.eval.retrieval_run.run_retrieve`` (tasks, relevance and outputs are
described there).
"""

from __future__ import annotations

import argparse

from slidefm.eval.retrieval import BACKENDS, TASKS
from slidefm.options import add_input_args, add_run_args, run_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="slide<->report and slide->slide retrieval")
    add_input_args(p)
    p.add_argument("--manifest", required=True, help="CSV: slide_id, case_id, report (+ labels)")
    p.add_argument("--text-column", default="report", help="report column (default report)")
    p.add_argument("--label-column", help="diagnosis column: enables slide2slide, goes in payload")
    p.add_argument("--split", help="only manifest rows of this split (e.g. test)")
    p.add_argument("--task", nargs="+", choices=TASKS, help="tasks (default: all possible)")
    p.add_argument("--backend", default="exact", choices=BACKENDS)
    p.add_argument("--qdrant-path", help="local Qdrant folder (default <out>/qdrant)")
    p.add_argument("--qdrant-url", help="Qdrant server URL instead of local mode")
    p.add_argument("--k", type=int, default=10, help="neighbours written per query")
    p.add_argument("--query", nargs="+", help="free-text queries: closest slides")
    add_run_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.eval.retrieval_run import format_retrieval, run_retrieve
    from slidefm.io.provenance import random_weight_notes

    info = run_retrieve(
        args.checkpoint,
        args.manifest,
        args.out,
        text_column=args.text_column,
        label_column=args.label_column,
        split=args.split,
        tasks=args.task,
        backend=args.backend,
        qdrant_path=args.qdrant_path,
        qdrant_url=args.qdrant_url,
        k=args.k,
        queries=args.query,
        **run_kwargs(args),
    )
    held = "" if info.get("num_training_rows_scored") else ", held-out patients only"
    print(f"retrieval ({info['backend']}) over {info['num_slides']} slides{held}:")
    for task, m in info["metrics"].items():
        print(f"  {task}: {format_retrieval(m)}")
    for row in info["text_queries"]:
        if row["rank"] == 1:
            print(f"  query {row['query']!r} → {row['slide_id']} ({row['diagnosis']})")
    if info.get("num_training_rows_scored"):
        print(f"WARNING: {info['num_training_rows_scored']} slides of training patients were "
              "scored (--include-seen): the metrics overestimate performance")  # fmt: skip
    for note in random_weight_notes(info):
        print(f"NOTE: {note}")
    return 0
