"""``slidefm text-towers list``: print the text-tower registry as a table."""

from __future__ import annotations

import argparse

from slidefm.pipelines.encoders_cmd import format_table

COLUMNS = ("name", "kind", "pool", "tokenizer", "weights (besides --weights random)")


def registry_rows() -> list[tuple[str, ...]]:
    """One row per registered text tower, in the order of :data:`COLUMNS`."""
    from slidefm.encoders.text import get_text_tower_entry, list_text_towers, text_tower_config

    rows = []
    for name in list_text_towers():
        e = get_text_tower_entry(name)
        cfg = text_tower_config(name)
        sp = cfg.kind == "sentencepiece"
        rows.append(
            (
                name,
                cfg.kind,
                cfg.pool if sp else "model's own",
                "report SentencePiece (--tokenizer)" if sp else "open_clip's",
                e.weights,
            )
        )
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("text-towers", help="text towers: list the registry")
    sub = p.add_subparsers(dest="text_towers_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="print every registered text tower")
    lst.add_argument("--details", action="store_true", help="also print a description")
    lst.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.encoders.text import get_text_tower_entry, list_text_towers

    print(format_table(registry_rows(), COLUMNS))
    if args.details:
        print()
        for name in list_text_towers():
            print(f"{name}: {get_text_tower_entry(name).description}")
    print(
        "\nUse: slidefm align --set model.text.kind=… (an alignment config's text section); "
        "open_clip weights: text.pretrained=TAG|PATH|random."
    )
    return 0
