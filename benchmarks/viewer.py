"""Viewer tile serving: Deep Zoom tile latency (p50/p95, cold and cached) and throughput under
8 concurrent clients, over real HTTP (uvicorn on 127.0.0.1), on the bundled slide and on a large
synthetic pyramidal TIFF (``slidefm.wsi.synthetic_tiff``).

Cold = the first request of a tile (never served before: read + resize + JPEG encode);
cached = the same tile again (the viewer's tile LRU). Tiles come from the full-resolution Deep
Zoom level and the level below it, in a fixed shuffled order. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def synthetic_slide(path: Path, side: int, seed: int = 0) -> Path:
    """A ``side``×``side`` Aperio-style pyramidal TIFF at 0.5 µm/px, tiled from the bundled
    slide's pixels (real texture, JPEG-compressed like a scanner's)."""
    from slidefm.wsi.reader import SlideReader
    from slidefm.wsi.synthetic_tiff import write_pyramid_tiff

    with SlideReader(REPO / "data" / "sample" / "CMU-1-Small-Region.svs") as r:
        src = r.read_region(0, 0, 0, r.info.width, r.info.height)
    reps = (side // src.shape[0] + 1, side // src.shape[1] + 1, 1)
    rgb = np.ascontiguousarray(np.tile(src, reps)[:side, :side])
    write_pyramid_tiff(path, rgb, mpp=0.5)
    return path


def synthetic_scores(slide: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A feature file with one tile per 256-px cell of the whole slide (random 16-d features)
    and a random-weight ABMIL checkpoint, so heatmap overlay tiles can be timed too."""
    import torch

    from slidefm.io.features import SlideFeatures, grid_from_coords, write_features
    from slidefm.models.mil import ABMIL, save_mil_checkpoint
    from slidefm.wsi.reader import SlideReader

    with SlideReader(slide) as r:
        w, h = r.info.width, r.info.height
    gx, gy = np.meshgrid(np.arange(0, w - 255, 256), np.arange(0, h - 255, 256))
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    rng = np.random.default_rng(seed)
    attrs = {"encoder": "random", "encoder_weights": "random", "target_mpp": 0.5, "patch_size": 256,
             "patch_size_level0": 256, "config_hash": "bench", "seed": seed}  # fmt: skip
    sf = SlideFeatures(
        slide.stem,
        rng.normal(size=(len(coords), 16)).astype(np.float32),
        coords,
        grid_from_coords(coords, 256),
        np.ones(len(coords), np.float32),
        attrs,
    )
    feats = write_features(out / f"{slide.stem}.h5", sf)
    torch.manual_seed(seed)
    meta = {"model": "abmil", "in_dim": 16, "num_classes": 2, "weights": "random",
            "model_kwargs": {"hidden": 16, "attn_dim": 8, "dropout": 0.0},
            "task": {"labels": ["y"], "classes": ["a", "b"], "multilabel": False}}  # fmt: skip
    mil = save_mil_checkpoint(out / "mil.pt", ABMIL(16, 2, 16, 8, 0.0), meta)
    return feats, mil


def _serve(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    return srv, th, f"http://127.0.0.1:{port}"


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2), "n": len(a)}  # fmt: skip


def bench_slide(
    slide: Path, n_tiles: int, clients: int, seed: int, features=None, mil=None
) -> dict:
    import httpx

    from slidefm.viewer.app import create_app
    from slidefm.viewer.build import build_viewer

    ns = argparse.Namespace(
        slide=str(slide), manifest=None, features=features and str(features),
        mil=mil and str(mil), align=None, prompts=None,
        top_k=5, cache_mb=512, device="cpu", seed=seed,
    )  # fmt: skip
    viewer = build_viewer(ns)
    sid = next(iter(viewer.cohort.entries))
    g = viewer.geometry(sid)
    top = g.level_count - 1
    addrs = [
        (lv, c, r)
        for lv in (top, top - 1)
        for c in range(g.level_tiles(lv)[0])
        for r in range(g.level_tiles(lv)[1])
    ]
    rng = np.random.default_rng(seed)
    rng.shuffle(addrs)
    need = n_tiles * 2
    if len(addrs) < need:
        raise SystemExit(f"{slide}: only {len(addrs)} tiles, need {need}")
    seq, par = addrs[:n_tiles], addrs[n_tiles:need]
    srv, th, base = _serve(create_app(viewer))
    urls = lambda a: [f"{base}/dz/{sid}/slide_files/{lv}/{c}_{r}.jpeg" for lv, c, r in a]  # noqa: E731
    out: dict = {"slide": slide.name, "size": [g.width, g.height], "dz_levels": g.level_count}
    with httpx.Client() as cl:

        def get(u: str) -> float:
            t0 = time.perf_counter()
            resp = cl.get(u)
            dt = (time.perf_counter() - t0) * 1e3
            if resp.status_code != 200:
                raise RuntimeError(f"{u}: HTTP {resp.status_code}")
            return dt

        cl.get(f"{base}/dz/{sid}/slide.dzi")  # open the slide outside the timings
        out["latency_cold"] = _pct([get(u) for u in urls(seq)])
        out["latency_cached"] = _pct([get(u) for u in urls(seq)])
        for name, batch in (("cold", urls(par)), ("cached", urls(par))):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as ex:
                list(ex.map(get, batch))
            out[f"tiles_per_s_{clients}_clients_{name}"] = round(
                len(batch) / (time.perf_counter() - t0), 1
            )
        if mil is not None:  # heatmap overlay tiles; the scores are computed before timing
            cl.get(f"{base}/api/slides/{sid}")
            heat = [u.replace("/slide_files/", "/mil_files/")[:-4] + "png" for u in urls(seq)]
            # the level where the whole slide is one tile: every feature tile is painted
            one = next(lv for lv in range(top, -1, -1) if g.level_tiles(lv) == (1, 1))
            out["heatmap_overlay"] = {
                "feature_tiles": viewer.scores.get(sid).features.num_tiles,
                "latency_cold": _pct([get(u) for u in heat]),
                "latency_cached": _pct([get(u) for u in heat]),
                "whole_slide_tile_cold_ms": round(
                    get(f"{base}/dz/{sid}/mil_files/{one}/0_0.png"), 2
                ),
            }
    out["cached_vs_cold_p50_speedup"] = round(
        out["latency_cold"]["p50_ms"] / max(out["latency_cached"]["p50_ms"], 1e-9), 2
    )
    srv.should_exit = True
    th.join(10)
    viewer.cohort.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=60, help="tiles per measurement")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--synthetic-side", type=int, default=8192, help="synthetic slide side, px")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpu",
        "clients": a.clients,
        "tiles": a.tiles,
        "seed": a.seed,
        "slides": [],
    }
    res["slides"].append(
        bench_slide(REPO / "data" / "sample" / "CMU-1-Small-Region.svs", a.tiles, a.clients, a.seed)
    )
    with tempfile.TemporaryDirectory() as tmp:
        big = synthetic_slide(Path(tmp) / "synthetic_large.tiff", a.synthetic_side, a.seed)
        feats, mil = synthetic_scores(big, Path(tmp), a.seed)
        res["slides"].append(bench_slide(big, a.tiles, a.clients, a.seed, feats, mil))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
