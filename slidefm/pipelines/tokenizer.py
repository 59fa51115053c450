"""``slidefm train-tokenizer``: a SentencePiece vocabulary for pathology reports.

Writes ``tok.model`` and, next to it, ``tok.json`` (seed, vocabulary size, thread count, the
report files with their sha256, number of reports) so the model can be traced and re-made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slidefm.io.atomic import atomic_path
from slidefm.pipelines.embed import file_sha256

# Report-text columns tried in order when none is named: ``text`` (generic report CSVs) and
# ``report`` (cohort manifests and ``synth-cohort``'s reports.csv).
TEXT_COLUMNS = ("text", "report")


def read_report_texts(paths: list[str], text_column: str | None = None) -> list[str]:
    """Non-empty report texts of one or more CSV files (column ``text_column``, or the first of
    :data:`TEXT_COLUMNS` present)."""
    import pandas as pd

    texts: list[str] = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"report CSV {p} not found")
        df = pd.read_csv(p)
        wanted = [text_column] if text_column else list(TEXT_COLUMNS)
        col = next((c for c in wanted if c in df), None)
        if col is None:
            raise ValueError(
                f"{p} has no column {' or '.join(map(repr, wanted))} "
                f"(columns: {', '.join(df.columns)}); pass --text-column"
            )
        texts.extend(str(t) for t in df[col].dropna() if str(t).strip())
    if not texts:
        raise ValueError(f"no report text in {', '.join(paths)}")
    return texts


def run_train_tokenizer(
    reports: list[str],
    out: str | Path,
    vocab_size: int,
    text_column: str | None = None,
    seed: int = 0,
    num_threads: int = 1,
    max_reports: int | None = None,
    lowercase: bool = True,
) -> dict:
    """Train, write ``out`` and its ``.json`` sidecar; returns the sidecar's content."""
    from slidefm.encoders.text import ReportTokenizer, train_tokenizer

    texts = read_report_texts(reports, text_column)
    if max_reports:
        texts = texts[:max_reports]
    out = Path(out)
    train_tokenizer(texts, vocab_size, out, seed=seed, num_threads=num_threads, lowercase=lowercase)
    tok = ReportTokenizer(out)
    info = {
        "tokenizer": str(out),
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "lowercase": tok.lowercase,
        "seed": seed,
        "num_threads": num_threads,
        "num_reports": len(texts),
        "text_column": text_column or f"first of {list(TEXT_COLUMNS)}",
        "reports": {str(p): file_sha256(p) for p in reports},
        "mean_pieces_per_report": round(
            sum(len(tok.pieces(t)) for t in texts[:500]) / min(len(texts), 500), 1
        ),
    }
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return info


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
