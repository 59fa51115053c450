"""Train a SentencePiece vocabulary on report CSVs (``slidefm train-tokenizer``) and write its
``.json`` sidecar (seed, vocabulary size, thread count, the report files with their sha256,
number of reports) so the model can be traced and re-made."""

from __future__ import annotations

import json
from pathlib import Path

from slidefm.encoders.registry import sha256_file
from slidefm.io.atomic import atomic_path
from slidefm.io.reports import TEXT_COLUMNS, read_report_texts


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
        "reports": {str(p): sha256_file(p) for p in reports},
        "mean_pieces_per_report": round(
            sum(len(tok.pieces(t)) for t in texts[:500]) / min(len(texts), 500), 1
        ),
    }
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return info
