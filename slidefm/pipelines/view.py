"""``slidefm view``: a local web viewer for slides and results.

``slidefm view SLIDE | --manifest CSV [--features DIR] [--mil CKPT] [--align CKPT --prompts
YAML] [--host 127.0.0.1 --port 8000]`` serves deep zoom of each slide (OpenSlide's Deep Zoom
generator into a bundled OpenSeadragon, no CDN), toggleable overlays (tissue outline, kept
tiles, MIL attention/attribution, per-tile zero-shot class probability), a side panel (slide
properties, MIL and zero-shot predictions, top-k retrieved reports) and, with a manifest, a
sortable cohort table. Binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from slidefm.viewer.app import create_app
    from slidefm.viewer.build import build_viewer

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address sees the slides", args.host)
    app = create_app(build_viewer(args))
    print(f"slidefm viewer on http://{args.host}:{args.port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="web viewer: deep zoom, heatmaps, tiles, scores, cohort table")
    p.add_argument("slide", nargs="?", help="one slide file (or use --manifest)")
    p.add_argument("--manifest", help="cohort CSV (slide_id, path, labels, report …)")
    p.add_argument(
        "--features", help="folder of <slide_id>.h5 (with errors.csv), or one .h5 for SLIDE"
    )
    p.add_argument("--mil", help="MIL checkpoint (model.pt of `slidefm mil train`)")
    p.add_argument("--align", help="alignment checkpoint (align.pt of `slidefm align`)")
    p.add_argument("--prompts", help="zero-shot prompt YAML (path or name under configs/prompts)")
    p.add_argument("--top-k", type=int, default=5, help="retrieved reports shown (default 5)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cache-mb", type=int, default=256, help="tile cache size in MiB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)
