"""``slidefm encoders list``: print the tile-encoder registry as a table."""

from __future__ import annotations

import argparse

from slidefm.encoders.registry import get_spec, list_encoders

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
    """Fixed-width text table."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        x.rstrip() for x in [fmt.format(*header), line, *(fmt.format(*r) for r in rows)]
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("encoders", help="tile encoders: list the registry")
    sub = p.add_subparsers(dest="encoders_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="print every registered tile encoder")
    lst.add_argument("--no-dev", action="store_true", help="hide dev-only entries")
    lst.add_argument("--details", action="store_true", help="also print licence and notes")
    lst.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(format_table(registry_rows(include_dev=not args.no_dev)))
    if args.details:
        print()
        for name in list_encoders(not args.no_dev):
            s = get_spec(name)
            print(f"{name}: {s.family}; licence: {s.licence}; {s.notes}")
    print(
        "\nWeights: --weights hub (HF cache, honours HF_HUB_OFFLINE) | --weights PATH "
        "(.pth/.bin/.safetensors) | --weights random (smoke tests; outputs marked random)."
    )
    return 0
