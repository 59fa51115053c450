"""``slidefm slide-encoders list``: print the slide-encoder registry as a table."""

from __future__ import annotations

import argparse

from slidefm.listing import add_list_command, print_listing

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
    add_list_command(
        subparsers, "slide-encoders", "slide encoders", run, "also print licence and source"
    )


def run(args: argparse.Namespace) -> int:
    from slidefm.models.registry import get_entry, list_slide_encoders

    details = [
        f"{n}: {e.description}; licence: {e.licence}; weights: {e.weight_source}"
        for n, e in ((n, get_entry(n)) for n in list_slide_encoders())
    ]
    footer = (
        "Weights: --weights hub (HF cache, honours HF_HUB_OFFLINE) | --weights PATH (file or "
        "snapshot folder, published layout) | --weights random (outputs marked random)."
    )
    return print_listing(registry_rows(), COLUMNS, details if args.details else None, footer)
