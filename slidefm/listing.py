"""``slidefm <family> list``: one table format and one command shape for every model registry
(tile encoders, slide encoders, MIL heads, text towers). Free of torch: ``--help`` stays fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def format_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Fixed-width text table: header, a rule, one line per row."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        x.rstrip() for x in [fmt.format(*header), line, *(fmt.format(*r) for r in rows)]
    )


def add_list_command(
    subparsers: argparse._SubParsersAction,
    command: str,
    family: str,
    run: Callable[[argparse.Namespace], int],
    details: str = "also print a description",
) -> argparse.ArgumentParser:
    """``slidefm <command> list [--details]`` → ``run(args)``; returns the ``list`` parser."""
    p = subparsers.add_parser(command, help=f"{family}: list the registry")
    sub = p.add_subparsers(dest=f"{command.replace('-', '_')}_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help=f"print every registered {family.rstrip('s')}")
    lst.add_argument("--details", action="store_true", help=details)
    lst.set_defaults(func=run)
    return lst


def print_listing(
    rows: Sequence[tuple[str, ...]],
    header: tuple[str, ...],
    details: Sequence[str] | None,
    footer: str,
) -> int:
    """The table, then (``--details``) one line per entry, then ``footer``; exit code 0."""
    print(format_table(rows, header))
    if details is not None:
        print()
        print("\n".join(details))
    print(f"\n{footer}")
    return 0
