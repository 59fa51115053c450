"""``slidefm embed-slides --model titan|gigapath`` on one very large slide: peak memory of the
whole command (CPU), next to what the published implementation needs for the same slide.

Unlike ``published_encoders.py`` (one forward, model excluded, peak above the resident set),
this runs the real command line end to end in a subprocess — reading the HDF5 feature file,
loading the weights in the published layout from disk, all blocks, writing the output — and
reports the child's peak resident set (``ru_maxrss``: everything the process ever held).

Inputs are generated, never shipped: one feature file of N tiles (N ≈ 64k by default, on a
square-ish grid with 1% holes, level-0 coords of 512-px tiles at 20× for TITAN / 256-px for
GigaPath), random features recorded as the entry's expected tile encoder, and a weight file
with exactly the published key names and shapes (``published_shapes.json`` in
``$SLIDEFM_SHARED_DATA/published_slide_encoders``), filled with random numbers. The output
embeddings are therefore random-weight numbers: only the memory and time mean anything.

Published memory model for the same N (not run: it would not fit this machine):
TITAN materialises its 2D-ALiBi bias for all tokens, (N+1)² float32 per head-broadcast matrix,
plus the attention scores per head; GigaPath holds its 1,000,001 × 768 float32 position table.

    python benchmarks/embed_slides_large.py                      # titan, N=64000 (hours on 1 core)
    python benchmarks/embed_slides_large.py --max-minutes 30     # peak of the first blocks
    python benchmarks/embed_slides_large.py --model gigapath --n 64000
    python benchmarks/embed_slides_large.py --n 4000             # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slidefm.io.features import SlideFeatures, write_features
from slidefm.models.registry import PUBLISHED

GIGAPATH_TABLE_BYTES = (1000 * 1000 + 1) * 768 * 4


def shapes_file() -> Path:
    root = Path(os.environ.get("SLIDEFM_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))
    path = root / "published_slide_encoders" / "published_shapes.json"
    if not path.is_file():
        sys.exit(f"error: {path} not found (set SLIDEFM_SHARED_DATA)")
    return path


def write_weights(model: str, out: Path) -> Path:
    """A weight file in the published layout (random values), as a user would download it."""
    from safetensors.torch import save_file

    shapes = json.loads(shapes_file().read_text())[model]["state_dict_shapes"]
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(*s, generator=g) for k, s in shapes.items()}
    if model == "titan":  # a snapshot folder, as `huggingface-cli download MahmoodLab/TITAN` leaves
        out.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / "model.safetensors"))
        return out
    path = out.with_suffix(".pth")
    torch.save({"model": sd} if model == "gigapath" else sd, path)
    return path


def write_slide(model: str, n: int, folder: Path, seed: int = 0) -> Path:
    """One feature file of ``n`` tiles: grid cells drawn without replacement, coords level-0 px."""
    entry = PUBLISHED[model]
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(n / 0.99))
    cells = np.sort(rng.choice(side * side, size=n, replace=False))
    grid = np.stack([cells % side, cells // side], 1).astype(np.int32)
    size = entry.tile_size or 256
    sf = SlideFeatures(
        slide_id="large",
        features=rng.normal(size=(n, entry.input_dim)).astype(np.float32),
        coords=grid.astype(np.int64) * size + 1024,
        grid=grid,
        tissue_fraction=np.ones(n, np.float32),
        attrs=dict(
            encoder=entry.tile_encoder or "any",
            encoder_weights="random (benchmark input)",
            target_mpp=entry.mpp or 0.5,
            patch_size=size,
            patch_size_level0=size,
            config_hash="benchmark",
            seed=seed,
        ),
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_features(folder / "large.h5", sf)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_command(
    model: str, weights: Path, feats: Path, out: Path, threads: int, max_minutes: float | None
) -> dict:
    """Run the command; sample its peak resident set (VmHWM) twice a second. With
    ``max_minutes`` the command is stopped after that long and the peak so far is reported
    (``completed: false``): every block of an encoder repeats the same footprint, so the first
    blocks already show the peak (``published_encoders.py --check-depth`` checks that)."""
    cmd = [sys.executable, "-m", "slidefm.cli", "embed-slides", "--model", model]
    cmd += ["--weights", str(weights), "--features", str(feats), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_kb, completed, trace = 0, True, []
    while proc.poll() is None:
        try:
            peak_kb = max(peak_kb, _status_kb(proc.pid, "VmHWM"))
            if len(trace) <= (time.perf_counter() - t0) // 30:  # resident set every 30 s
                trace.append(round(_status_kb(proc.pid, "VmRSS") / 1e6, 2))
        except (FileNotFoundError, ProcessLookupError):
            break
        if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
            proc.kill()
            completed = False
            break
        time.sleep(0.5)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if completed and proc.returncode != 0:
        sys.exit(f"error: embed-slides failed:\n{err[-2000:]}")
    if completed:  # the kernel's own figure for the whole life of the process
        peak_kb = max(peak_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {
        "peak_rss_gb": peak_kb * 1024 / 1e9,
        "wall_s": wall,
        "completed": completed,
        "rss_gb_every_30s": trace,
        "command": " ".join(cmd[1:]),
    }


def published_model_gb(model: str, n: int) -> dict:
    heads = 12
    if model == "titan":
        bias = (n + 1) ** 2 * 4
        return {
            "published_bias_one_matrix_gb": bias / 1e9,
            "published_bias_plus_scores_per_head_gb": bias * (1 + heads) / 1e9,
        }
    return {"published_position_table_gb": GIGAPATH_TABLE_BYTES / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="titan", choices=["titan", "gigapath"])
    ap.add_argument("--n", type=int, default=64000, help="tiles in the slide")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop the command after this long"
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        feats = write_slide(a.model, a.n, work / "features").parent
        weights = write_weights(a.model, work / f"{a.model}_weights")
        res = run_command(a.model, weights, feats, work / "emb.h5", a.threads, a.max_minutes)
    pub = published_model_gb(a.model, a.n)
    ref = next(iter(pub.values()))
    print(
        json.dumps(
            {
                "benchmark": "embed_slides_large",
                "model": a.model,
                "n_tiles": a.n,
                "threads": a.threads,
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
                "weights": "random values in the published layout (memory/time only)",
                **res,
                **pub,
                "published_over_ours_ratio": ref / res["peak_rss_gb"],
                "under_4_gb": res["peak_rss_gb"] < 4.0,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
