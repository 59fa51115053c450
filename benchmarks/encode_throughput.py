"""End-to-end ``encode-slides`` tiles/s vs the tile encoder's pure forward tiles/s on
pre-made tensors of the same batch size, measured side by side. A ratio near 1 means reading,
tiling and resampling are hidden behind the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from slidefm.encoders.cohort import run_encode
from slidefm.encoders.encode_config import EncodeConfig
from slidefm.encoders.tile import TileEncoder
from slidefm.wsi.jobs import SlideJob

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--slide", type=Path, default=REPO / "data" / "sample" / "CMU-1-Small-Region.svs"
    )
    ap.add_argument("--copies", type=int, default=3, help="encode the slide this many times")
    ap.add_argument("--encoder", default="dinov2_vits14")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    enc = TileEncoder.create(a.encoder, weights="random", device=a.device)
    cfg = EncodeConfig(
        encoder=a.encoder,
        weights="random",
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        min_tissue=0.0,
        qc=False,
    )
    tiles = torch.randint(
        0, 256, (a.batch_size, cfg.patch_size, cfg.patch_size, 3), dtype=torch.uint8
    )
    enc(tiles.to(enc.device))  # warm-up

    with tempfile.TemporaryDirectory() as tmp:
        jobs = [SlideJob(f"copy{i}", str(a.slide)) for i in range(a.copies)]
        run_encode(jobs[:1], cfg, Path(tmp) / "warm", encoder=enc, progress=False)
        t0 = time.perf_counter()
        res = run_encode(jobs, cfg, Path(tmp) / "out", encoder=enc, progress=False)
        e2e_s = time.perf_counter() - t0
    n_tiles = sum(r.tiles for r in res)

    n_batches = max(1, n_tiles // a.batch_size)
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        enc(tiles.to(enc.device, non_blocking=True))
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    fwd_s = time.perf_counter() - t0
    e2e_tps, fwd_tps = n_tiles / e2e_s, n_batches * a.batch_size / fwd_s
    print(
        json.dumps(
            {
                "benchmark": "encode_throughput",
                "machine": f"{platform.machine()}, {os.cpu_count()} cpu, device={enc.device}",
                "encoder": a.encoder,
                "weights": "random (architecture timing only)",
                "batch_size": a.batch_size,
                "num_workers": a.num_workers,
                "tiles": n_tiles,
                "end_to_end_tiles_per_s": round(e2e_tps, 1),
                "pure_forward_tiles_per_s": round(fwd_tps, 1),
                "ratio": round(e2e_tps / fwd_tps, 3),
                "target_ratio": 0.8,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
