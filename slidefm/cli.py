"""The one ``slidefm`` command. Thin: each sub-command lives in a ``slidefm.pipelines`` module
that exposes ``add_parser(subparsers)`` and sets ``func`` on its parser; parsing stays here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterator

from slidefm.options import add_common  # noqa: F401  (re-exported: older imports)

# Pipeline modules that register sub-commands, in the order ``--help`` lists them.
PIPELINES = [
    "info",
    "encoders_cmd",
    "slide_encoders_cmd",
    "mil_heads_cmd",
    "text_towers_cmd",
    "encode",
    "mil",
    "probe",
    "heatmap",
    "pretrain",
    "pretrain_tiles",
    "probe_tiles",
    "embed",
    "tokenizer",
    "align",
    "zero_shot",
    "retrieve",
    "synth",
    "view",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidefm",
        description="Slide-level foundation model toolkit: encode slides, pretrain, align with reports, MIL.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in PIPELINES:
        importlib.import_module(f"slidefm.pipelines.{name}").add_parser(sub)
    return parser


def iter_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command path of ``parser``: ``()``, ``("info",)``, ``("mil", "train")``, …"""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from iter_commands(sub, (*path, name))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from slidefm.runtime import check_interrupted, install_interrupt_flag

    install_interrupt_flag()
    try:
        rc = args.func(args)
        check_interrupted()  # a Ctrl-C swallowed in a destructor still ends the run as interrupted
    except KeyboardInterrupt:
        print(
            "Interrupted: finished outputs are complete; re-run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable / full output folder, a path that is a file, ...
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)  # OSError's text names the file
        return 2
    except Exception as e:  # last resort: one line, never a bare traceback
        if args.verbose:
            raise
        print(
            f"error: {type(e).__name__}: {e} (an unexpected error; run `slidefm -v "
            f"{args.command} ...` for the traceback)",
            file=sys.stderr,
        )
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
