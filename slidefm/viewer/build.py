"""The viewer's state from the ``slidefm view`` options: the cohort (one slide or a manifest)
and the models whose layers it shows; shared by the command, the tests and the benchmark."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def build_viewer(args: argparse.Namespace):
    """The ``Viewer`` state from parsed options (also used by tests and the benchmark)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"slidefm view needs the viewer extra ({e.name} is missing): pip install 'slidefm[viewer]'"
        ) from e
    from slidefm.viewer.analysis import Models
    from slidefm.viewer.app import Viewer
    from slidefm.viewer.cohort import Cohort

    if (args.slide is None) == (args.manifest is None):
        raise ValueError("give one slide file or --manifest CSV")
    if args.prompts and not args.align:
        raise ValueError("--prompts needs --align CKPT (the text tower that embeds them)")
    cohort = (
        Cohort.from_manifest(args.manifest, args.features)
        if args.manifest
        else Cohort.from_slide(args.slide, args.features)
    )
    models = Models(args.mil, args.align, args.prompts, args.top_k, args.device, args.seed)
    if models.mil_random:
        log.warning("RANDOM WEIGHTS: the MIL checkpoint %s was never trained", args.mil)
    return Viewer(cohort, models, cache_mb=args.cache_mb)
