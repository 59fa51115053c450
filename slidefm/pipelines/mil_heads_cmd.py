"""``slidefm mil-heads list``: print the MIL-head registry as a table."""

from __future__ import annotations

import argparse

from slidefm.listing import add_list_command, print_listing

COLUMNS = ("name", "needs", "positions", "attention", "options")


def registry_rows() -> list[tuple[str, ...]]:
    """One row per registered MIL head, in the order of :data:`COLUMNS`."""
    from slidefm.models.mil import get_mil_head, list_mil_heads

    rows = []
    for name in list_mil_heads():
        e = get_mil_head(name)
        needs = "slide encoder" if e.needs_encoder else "tile features"
        yes = {True: "yes", False: "no"}
        rows.append((name, needs, yes[e.uses_grid], yes[e.attention], ", ".join(e.options())))
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_list_command(subparsers, "mil-heads", "MIL heads", run)


def run(args: argparse.Namespace) -> int:
    from slidefm.models.mil import get_mil_head, list_mil_heads

    details = [f"{n}: {get_mil_head(n).description}" for n in list_mil_heads()]
    footer = (
        "Use: slidefm mil train --model NAME (options: the MIL config's head options); heads "
        "start from seeded random weights; slide_encoder also takes --slide-encoder."
    )
    return print_listing(registry_rows(), COLUMNS, details if args.details else None, footer)
