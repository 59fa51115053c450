"""``slidefm encode-slides``: slides → one ``<slide_id>.h5`` of tile features each.

The command line of ``slidefm.encoders.cohort.run_encode`` (resume, shards, run records, disk
errors are explained there). Options: ``--config`` YAML < the explicit flags below <
``--set key=value`` (``slidefm.config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import TYPE_CHECKING, Any

from slidefm.wsi.modes import ENCODE_CHOICES as CHOICES
from slidefm.wsi.modes import TISSUE_MODES

if TYPE_CHECKING:  # heavy modules load inside the functions (`slidefm --help` stays fast)
    from slidefm.encoders.encode_config import EncodeConfig

FLAG_TO_FIELD = {
    "encoder": str,
    "weights": str,
    "target_mpp": float,
    "patch_size": int,
    "overlap": int,
    "min_tissue": float,
    "mpp": float,
    "stain_norm": str,
    "batch_size": int,
    "num_workers": int,
    "device": str,
    "precision": str,
    "feature_dtype": str,
    "border_tiles": str,
}


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (≥ 1), got {v}")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slidefm.options import add_common

    p = sub.add_parser("encode-slides", help="tile slides and embed tiles → one HDF5 per slide")
    p.add_argument("inputs", nargs="*", help="slide files and/or folders (searched recursively)")
    p.add_argument("--manifest", help="CSV with slide_id, path (optional mpp column)")
    p.add_argument("--out", required=True, help="output folder for <slide_id>.h5, qc/, errors.csv")
    for name, typ in FLAG_TO_FIELD.items():
        kw: dict[str, Any] = {"type": typ}
        if name in CHOICES:
            kw["choices"] = CHOICES[name]
        if name == "batch_size":
            kw["type"] = _positive_int
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"config {name}" + (f" ({' | '.join(CHOICES[name])})" if name in CHOICES else ""),
            **kw,
        )
    p.add_argument(
        "--tissue",
        choices=TISSUE_MODES,
        default=None,
        help="tissue detection: brightfield (H&E/IHC), fluorescence (signal on dark), "
        "auto (from the thumbnail's background; default). Config: tissue.mode",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="re-encode slides whose files in --out were made with other options",
    )
    p.add_argument("--no-qc", action="store_true", help="skip QC thumbnails")
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="split the cohort into N shards (default: torchrun world size)",
    )
    p.add_argument("--shard-index", type=int, default=None, help="which shard this process runs")
    p.add_argument("--no-progress", action="store_true")
    add_common(p, "encode")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    """YAML < explicit flags (``--tissue`` is ``tissue.mode``, ``--no-qc`` is ``qc``) < ``--set``."""
    from slidefm.config import flag_values, load_config
    from slidefm.encoders.encode_config import EncodeConfig

    flags = flag_values(args, {**{k: k for k in FLAG_TO_FIELD}, "tissue": "tissue.mode"})
    if getattr(args, "no_qc", False):
        flags["qc"] = False
    return load_config(EncodeConfig, args.config, args.overrides, "encode", flags)


def run(args: argparse.Namespace) -> int:
    import torch

    from slidefm.encoders.cohort import print_summary, run_encode
    from slidefm.runtime import dist_info
    from slidefm.wsi.jobs import collect_slides, shard

    cfg = config_from_args(args)
    jobs = collect_slides(args.inputs, args.manifest)
    rank, world = dist_info()
    num_shards = args.num_shards if args.num_shards is not None else world
    shard_index = args.shard_index if args.shard_index is not None else rank
    if world > 1 and torch.cuda.is_available() and cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    jobs = shard(jobs, num_shards, shard_index)
    results = run_encode(
        jobs,
        cfg,
        args.out,
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=getattr(args, "overwrite", False),
    )
    print_summary(results)
    return 1 if any(r.status == "failed" for r in results) else 0
