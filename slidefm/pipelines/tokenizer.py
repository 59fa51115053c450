"""``slidefm train-tokenizer``: a SentencePiece vocabulary for pathology reports.

Writes ``tok.model`` and, next to it, ``tok.json`` (seed, vocabulary size, thread count, the
report files with their sha256, number of reports) so the model can be traced and re-made
(``slidefm.encoders.tokenizer_train``).
"""

from __future__ import annotations

import argparse

from slidefm.io.reports import TEXT_COLUMNS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on report text")
    p.add_argument("--reports", required=True, nargs="+", help="CSV file(s) with report text")
    p.add_argument(
        "--text-column",
        default=None,
        help=f"column holding the report (default: the first of {', '.join(TEXT_COLUMNS)})",
    )
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (8000)")
    p.add_argument("--out", required=True, help="output .model file (a .json sidecar is added)")
    p.add_argument("--num-threads", type=int, default=1, help="SentencePiece threads (1)")
    p.add_argument("--cased", action="store_true", help="keep upper/lower case (default: lower)")
    p.add_argument("--max-reports", type=int, default=None, help="use the first N reports only")
    p.add_argument("--seed", type=int, default=0, help="random seed, recorded (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.encoders.tokenizer_train import run_train_tokenizer

    info = run_train_tokenizer(
        args.reports,
        args.out,
        args.vocab_size,
        text_column=args.text_column,
        seed=args.seed,
        num_threads=args.num_threads,
        max_reports=args.max_reports,
        lowercase=not args.cased,
    )
    print(
        f"tokenizer {info['tokenizer']}: {info['vocab_size']} pieces from {info['num_reports']} "
        f"reports, {info['mean_pieces_per_report']} pieces per report on average "
        f"(sha256 {info['sha256'][:12]}, seed {info['seed']})"
    )
    return 0
