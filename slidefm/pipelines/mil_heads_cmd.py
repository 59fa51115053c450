"""``slidefm mil-heads list``: print the MIL-head registry as a table."""

from __future__ import annotations

import argparse

from slidefm.pipelines.encoders_cmd import format_table

COLUMNS = ("name", "needs", "positions", "attention", "options (model_kwargs)")


def registry_rows() -> list[tuple[str, ...]]:
    """One row per registered MIL head, in the order of :data:`COLUMNS`."""
    from slidefm.models.mil import get_mil_head, list_mil_heads

    rows = []
    for name in list_mil_heads():
        e = get_mil_head(name)
        rows.append(
            (
                name,
                "slide encoder" if e.needs_encoder else "tile features",
                "yes" if e.uses_grid else "no",
                "yes" if e.attention else "no",
                ", ".join(e.options()),
            )
        )
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mil-heads", help="MIL heads: list the registry")
    sub = p.add_subparsers(dest="mil_heads_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="print every registered MIL head")
    lst.add_argument("--details", action="store_true", help="also print a description")
    lst.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.models.mil import get_mil_head, list_mil_heads

    print(format_table(registry_rows(), COLUMNS))
    if args.details:
        print()
        for name in list_mil_heads():
            print(f"{name}: {get_mil_head(name).description}")
    print(
        "\nUse: slidefm mil train --model NAME (options: the MIL config's head options); heads "
        "start from seeded random weights; slide_encoder also takes --slide-encoder."
    )
    return 0
