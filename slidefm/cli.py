"""The one ``slidefm`` command. Thin: each sub-command lives in a ``slidefm.pipelines`` module
that exposes ``add_parser(subparsers)`` and sets ``func`` on its parser; parsing stays here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Pipeline modules that register sub-commands, in the order ``--help`` lists them.
PIPELINES = [
    "info",
    "encoders_cmd",
    "slide_encoders_cmd",
    "encode",
    "mil",
    "probe",
    "heatmap",
    "pretrain",
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


def add_common(p: argparse.ArgumentParser, config_subdir: str | None = None) -> None:
    """Options every pipeline shares: --config, --set overrides, --seed."""
    if config_subdir is not None:
        p.add_argument(
            "--config",
            default=None,
            help=f"YAML config (path or name under configs/{config_subdir}/)",
        )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed, recorded in outputs (default 0)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
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
