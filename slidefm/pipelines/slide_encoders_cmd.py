"""``slidefm slide-encoders list``: print the slide-encoder registry as a table."""

from __future__ import annotations

import argparse

from slidefm.pipelines.encoders_cmd import format_table

COLUMNS = ("name", "kind", "tile encoder", "tile", "in", "out", "readouts", "weights")


def registry_rows() -> list[tuple[str, ...]]:
    from slidefm.models.registry import get_entry, list_slide_encoders

    rows = []
    for name in list_slide_encoders():
        e = get_entry(name)
        tile = f"{e.tile_size}px@{e.mpp}µm/px" if e.tile_size else "any"
        weights = (
            f"hf:{e.hub_repo}"
            if e.hub_repo
            else ("PATH" if e.kind == "published" else "pretrain ckpt")
        )
        rows.append(
            (
                name,
                e.kind,
                e.tile_encoder or f"any {e.input_dim}-d",
                tile,
                str(e.input_dim),
                str(e.output_dim),
                ",".join(e.readouts),
                weights,
            )
        )
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("slide-encoders", help="slide encoders: list the registry")
    sub = p.add_subparsers(dest="slide_encoders_command", metavar="ACTION")
    sub.required = True
    lst = sub.add_parser("list", help="print every registered slide encoder")
    lst.add_argument("--details", action="store_true", help="also print licence and source")
    lst.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidefm.models.registry import get_entry, list_slide_encoders

    print(format_table(registry_rows(), COLUMNS))
    if args.details:
        print()
        for name in list_slide_encoders():
            e = get_entry(name)
            print(f"{name}: {e.description}; licence: {e.licence}; weights: {e.weight_source}")
    print(
        "\nWeights: --weights hub (HF cache, honours HF_HUB_OFFLINE) | --weights PATH (file or "
        "snapshot folder, published layout) | --weights random (outputs marked random)."
    )
    return 0
