"""Published slide encoders on slidefm's attention: peak memory and time vs N tiles (CPU).

For Prov-GigaPath (``gigapath``, LongNet with attended padding) and TITAN-preview (``titan``,
2D ALiBi), full width (768-d, 16 / 12 heads), random weights, one slide, no_grad, compared with
the published implementation's own memory model:

* GigaPath holds its whole position table, 1,000,001 × 768 float32 (3.07 GB) whatever N;
* TITAN materialises its ALiBi bias over all tokens: at least one float32 (N+1) × (N+1)
  matrix (per head in attention). The ``titan_materialised`` path runs our ``naive`` backend,
  which does exactly that (scores + bias per head), where it fits: measured, not modelled.

Peak memory = VmHWM − VmRSS of a fresh subprocess whose peak mark is reset right before the
forward (model and inputs already resident are not counted), as in benchmarks/slide_encoder.py.
In inference a block's activations are freed before the next block runs, so peak memory does
not depend on depth (checked by ``--check-depth``), and ``--depth`` (default: published depth)
only scales time; the JSON records the depth used.

Default (modest, shared machine): N ∈ {1000, 4000}, depth 1 → a few minutes on one core.
Full grid: ``--ns 1000,4000,16000,64000`` (64k full attention takes tens of minutes per layer
on one CPU core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide_encoder import _proc_status, slope  # noqa: E402

from slidefm.models import create_slide_encoder  # noqa: E402

GIGAPATH_TABLE_BYTES = (1000 * 1000 + 1) * 768 * 4
PATHS = {  # name -> (registry model, attention backend)
    "gigapath_sdpa": ("gigapath", "sdpa"),
    "titan_blockwise_sdpa": ("titan", "sdpa"),
    "titan_materialised": ("titan", "naive"),
}


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    enc = create_slide_encoder(
        spec["model"], weights="random", depth=spec["depth"], backend=spec["backend"]
    )
    entry = enc.registry_entry
    n = spec["n"]
    side = math.ceil(math.sqrt(n))
    cells = torch.randperm(side * side)[:n]
    coords = torch.stack([cells % side, cells // side], -1)[None] * entry.tile_size + 4096
    feats = torch.randn(1, n, entry.input_dim)
    Path("/proc/self/clear_refs").write_text("5")
    base = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    z = enc.embed(feats, coords, float(entry.tile_size))
    elapsed = time.perf_counter() - t0
    peak = _proc_status()["VmHWM"] - base
    assert bool(torch.isfinite(z).all())
    return {"peak_mem_mb": peak / 2**20, "time_s": elapsed}


def measure(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--_worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"skipped": f"failed: {tail[0][:300]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="1000,4000", help="tile counts N")
    ap.add_argument("--depth", type=int, default=1, help="blocks run (memory is per block)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--materialised-max-n", type=int, default=4000, help="naive path up to N")
    ap.add_argument("--check-depth", action="store_true", help="also run titan N=max at depth 6")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(worker(json.loads(a._worker))))
        return
    ns = [int(x) for x in a.ns.split(",")]
    paths = a.paths.split(",")
    results: dict[str, dict[str, dict]] = {p: {} for p in paths}
    for n in ns:
        for p in paths:
            model, backend = PATHS[p]
            if backend == "naive" and n > a.materialised_max_n:
                est = 4 * 12 * (n + 1) ** 2 * 4 / 2**30
                results[p][str(n)] = {"skipped": f"N×N scores+bias ≈ {est:.0f} GB per block"}
            else:
                spec = dict(model=model, backend=backend, n=n, depth=a.depth, threads=a.threads)
                results[p][str(n)] = measure(spec)
            print(f"{p:>22} N={n:>6}: {results[p][str(n)]}", file=sys.stderr, flush=True)

    def ok(p: str) -> dict[int, dict]:
        return {int(n): r for n, r in results.get(p, {}).items() if "peak_mem_mb" in r}

    published_model = {
        "gigapath_position_table_mb": GIGAPATH_TABLE_BYTES / 2**20,
        "titan_bias_lower_bound_mb": {str(n): (n + 1) ** 2 * 4 / 2**20 for n in ns},
        "titan_bias_per_head_mb": {str(n): 12 * (n + 1) ** 2 * 4 / 2**20 for n in ns},
    }
    ratios = {
        "gigapath_published_table_over_ours": {
            str(n): GIGAPATH_TABLE_BYTES / 2**20 / max(r["peak_mem_mb"], 1e-9)
            for n, r in ok("gigapath_sdpa").items()
        },
        "titan_published_bias_lower_bound_over_ours": {
            str(n): (n + 1) ** 2 * 4 / 2**20 / max(r["peak_mem_mb"], 1e-9)
            for n, r in ok("titan_blockwise_sdpa").items()
        },
        "titan_materialised_over_blockwise_measured": {
            str(n): {
                "memory": ok("titan_materialised")[n]["peak_mem_mb"]
                / max(ok("titan_blockwise_sdpa")[n]["peak_mem_mb"], 1e-9),
                "time": ok("titan_materialised")[n]["time_s"]
                / ok("titan_blockwise_sdpa")[n]["time_s"],
            }
            for n in sorted(set(ok("titan_materialised")) & set(ok("titan_blockwise_sdpa")))
        },
    }
    depth_check = None
    if a.check_depth and ok("titan_blockwise_sdpa"):
        n = max(ok("titan_blockwise_sdpa"))
        r6 = measure(dict(model="titan", backend="sdpa", n=n, depth=6, threads=a.threads))
        depth_check = {"n": n, "depth": 6, **r6, f"depth_{a.depth}": ok("titan_blockwise_sdpa")[n]}
    out = {
        "benchmark": "published_encoders",
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "threads": a.threads,
        "depth_run": a.depth,
        "torch": torch.__version__,
        "seed": 0,
        "weights": "random (memory/time do not depend on the values)",
        "results": results,
        "published_memory_model": published_model,
        "ratios": ratios,
        "memory_growth_exponent": {
            p: slope([(n, r["peak_mem_mb"]) for n, r in ok(p).items()]) for p in paths
        },
        "depth_check": depth_check,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
