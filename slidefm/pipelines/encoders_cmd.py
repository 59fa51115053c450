"""``slidefm encoders list``: print the tile-encoder registry as a table."""

from __future__ import annotations

import argparse

from slidefm import listing
from slidefm.encoders.registry import get_spec, list_encoders
from slidefm.listing import add_list_command, print_listing

COLUMNS = ("name", "architecture", "embed dim", "input", "pooling", "weights (--weights hub)")


def registry_rows(include_dev: bool = True) -> list[tuple[str, ...]]:
    """One row per registered encoder, in the order of :data:`COLUMNS`."""
    rows = []
    for name in list_encoders(include_dev):
        s = get_spec(name)
        size = f"{s.input_size}" if s.resize == s.input_size else f"{s.resize}→crop {s.input_size}"
        rows.append(
            (
                name,
                s.arch,
                str(s.embed_dim),
                size,
                s.pooling,
                s.hub_id or "none (random only, dev)",
            )
        )
    return rows


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = COLUMNS) -> str:
    """The tile-encoder table (``listing.format_table`` with these columns by default)."""
    return listing.format_table(rows, header)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    lst = add_list_command(
        subparsers, "encoders", "tile encoders", run, "also print licence and notes"
    )
    lst.add_argument("--no-dev", action="store_true", help="hide dev-only entries")


def run(args: argparse.Namespace) -> int:
    names = list_encoders(not args.no_dev)
    details = [
        f"{n}: {s.family}; licence: {s.licence}; {s.notes}"
        for n, s in ((n, get_spec(n)) for n in names)
    ]
    footer = (
        "Weights: --weights hub (HF cache, honours HF_HUB_OFFLINE) | --weights PATH "
        "(.pth/.bin/.safetensors) | --weights random (smoke tests; outputs marked random)."
    )
    rows = registry_rows(include_dev=not args.no_dev)
    return print_listing(rows, COLUMNS, details if args.details else None, footer)
