"""``slidefm text-towers list``: print the text-tower registry as a table."""

from __future__ import annotations

import argparse

from slidefm.listing import add_list_command, print_listing

COLUMNS = ("name", "kind", "pool", "tokenizer", "weights (besides --weights random)")


def registry_rows() -> list[tuple[str, ...]]:
    """One row per registered text tower, in the order of :data:`COLUMNS`."""
    from slidefm.encoders.text import get_text_tower_entry, list_text_towers, text_tower_config

    rows = []
    for name in list_text_towers():
        cfg = text_tower_config(name)
        sp = cfg.kind == "sentencepiece"
        pool = cfg.pool if sp else "model's own"
        tok = "report SentencePiece (--tokenizer)" if sp else "open_clip's"
        rows.append((name, cfg.kind, pool, tok, get_text_tower_entry(name).weights))
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_list_command(subparsers, "text-towers", "text towers", run)


def run(args: argparse.Namespace) -> int:
    from slidefm.encoders.text import get_text_tower_entry, list_text_towers

    details = [f"{n}: {get_text_tower_entry(n).description}" for n in list_text_towers()]
    footer = (
        "Use: slidefm align --set model.text.kind=… (an alignment config's text section); "
        "open_clip weights: text.pretrained=TAG|PATH|random."
    )
    return print_listing(registry_rows(), COLUMNS, details if args.details else None, footer)
