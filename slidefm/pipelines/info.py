"""``slidefm info SLIDE``: what a slide is, and what reading it at a target µm/px will do."""

from __future__ import annotations

import argparse
import json

from slidefm.wsi.reader import MissingMPPError, SlideReader


def describe(
    path: str, target_mpp: float = 0.5, patch_size: int = 256, mpp: float | None = None
) -> dict:
    """Slide properties plus the pyramid level and region size a target µm/px reads."""
    with SlideReader(path, mpp_override=mpp) as r:
        i = r.info
        d = {
            "path": i.path,
            "backend": i.backend,
            "vendor": i.vendor,
            "dimensions": [i.width, i.height],
            "level_count": i.level_count,
            "level_dimensions": [list(x) for x in i.level_dimensions],
            "level_downsamples": [round(x, 4) for x in i.level_downsamples],
            "mpp": list(i.mpp) if i.mpp else None,
            "mpp_source": i.mpp_source,
            "objective_power": i.objective_power,
        }
        try:
            level = r.best_level_for_mpp(target_mpp)
        except MissingMPPError as e:
            d["read_plan"] = f"unknown: {e}"
            return d
        level_mpp = i.level_mpp(level)
        extent0 = patch_size * target_mpp / r.mpp
        d["read_plan"] = {
            "target_mpp": target_mpp,
            "patch_size": patch_size,
            "tile_um": patch_size * target_mpp,
            "read_level": level,
            "read_level_mpp": round(level_mpp, 5),
            "tile_extent_level0_px": round(extent0, 3),
            "tile_extent_read_level_px": round(extent0 / i.level_downsamples[level], 3),
            "resize_factor": round(level_mpp / target_mpp, 5),
            "upsampling": r.mpp > target_mpp * 1.001,
        }
    return d


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a slide's properties and read plan")
    p.add_argument("slide")
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px override")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    d = describe(args.slide, args.target_mpp, args.patch_size, args.mpp)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<28} {vv}")
        else:
            print(f"{k:<30} {v}")
    return 0
