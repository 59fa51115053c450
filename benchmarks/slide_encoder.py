"""Slide-encoder forward pass: peak memory and time vs number of tiles N, per attention path.

Paths: 2D-ALiBi full attention with the materialised N×N bias (``naive``, what TITAN does),
blockwise (``sdpa``: bias built per query block inside torch SDPA), ``flex`` (bias inside
FlexAttention's score_mod; CPU: compiled, inference only), ``xformers`` (CUDA only), and LongNet
dilated attention (``sdpa`` per segment). Prints one JSON object: per-path results, the
blockwise/materialised ratios where both ran, the fitted memory growth exponent (slope of
log peak memory vs log N), and the LongNet / full-attention time ratio at the largest N.

Peak memory of one forward (batch of one slide, no_grad):
* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the forward.
* CPU: torch has no allocation counter, so every measurement runs in a fresh subprocess;
  it resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` ← 5) right before the
  forward and reports VmHWM − VmRSS: the extra resident memory at the forward's peak
  (model and inputs already resident are not counted).
A path whose estimated memory exceeds ``--mem-cap-gb`` is recorded as skipped, with the reason.

CPU defaults finish in a few minutes: ``python benchmarks/slide_encoder.py``; GPU:
``python benchmarks/slide_encoder.py --device cuda --max-n 65536 --config titan_like``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from slidefm.models.slide_encoder import SlideEncoder

REPO = Path(__file__).resolve().parent.parent
PATHS = {  # name -> (which model, backend)
    "alibi_materialised": ("alibi", "naive"),
    "alibi_blockwise_sdpa": ("alibi", "sdpa"),
    "alibi_flex": ("alibi", "flex"),
    "alibi_xformers": ("alibi", "xformers"),
    "longnet_sdpa": ("longnet", "sdpa"),
}


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def worker(spec: dict) -> dict:
    """One measurement in this process: build, warm up, then one measured forward."""
    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    cfg_name = spec["alibi_config"] if spec["model"] == "alibi" else spec["longnet_config"]
    torch.manual_seed(0)
    enc = SlideEncoder.from_config(cfg_name, backend=spec["backend"]).eval().to(dev)
    n = spec["n"]
    side = math.ceil(math.sqrt(n))
    cells = torch.randperm(side * side)[:n]
    grid = torch.stack([cells % side, cells // side], -1)[None].to(dev)
    feats = torch.randn(1, n, enc.config.input_dim, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        enc(feats, grid)  # warm-up (compiles flex)
        sync()
        warm_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            base = _proc_status()["VmRSS"]
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            enc(feats, grid)
            sync()
            times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            peak = _proc_status()["VmHWM"] - base
    return {"peak_mem_mb": peak / 2**20, "time_s": min(times), "warmup_s": warm_s}


def estimate_gb(model: str, backend: str, n: int, cfg) -> float:
    """Rough forward memory: naive holds ~4 [H, T, T] float32 tensors (scores, bias, softmax);
    the other paths hold O(N) activations plus bounded blocks."""
    act = 30 * n * cfg.d_model * 4 + 4 * 2**25 * 4
    if model == "alibi" and backend == "naive":
        return (4 * cfg.num_heads * (n + cfg.num_prefix_tokens) ** 2 * 4 + act) / 2**30
    return act / 2**30


def measure(spec: dict) -> dict:
    if spec["device"] == "cuda":
        return worker(spec)
    cmd = [sys.executable, __file__, "--_worker", json.dumps(spec)]
    # glibc keeps freed heap memory for reuse, hiding later peaks from RSS: serve every
    # allocation ≥ 64 KiB by mmap (returned to the kernel on free) so RSS tracks live memory.
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"skipped": f"failed: {tail[0][:300]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) on log(n)."""
    pts = [(math.log(n), math.log(v)) for n, v in points if v > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ns", default="1024,4096,16384,65536", help="tile counts N")
    ap.add_argument("--max-n", type=int, default=None, help="skip N above (CPU default 16384)")
    ap.add_argument("--alibi-config", default="tiny")
    ap.add_argument("--longnet-config", default="tiny_longnet")
    ap.add_argument("--paths", default=None, help=f"comma list of {', '.join(PATHS)}")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    ap.add_argument("--mem-cap-gb", type=float, default=None, help="skip paths estimated above")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(worker(json.loads(a._worker))))
        return

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    max_n = a.max_n or (65536 if cuda else 16384)
    if a.mem_cap_gb is not None:
        cap = a.mem_cap_gb
    elif cuda:
        cap = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        cap = 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    paths = a.paths.split(",") if a.paths else [p for p in PATHS if cuda or "xformers" not in p]
    threads = a.threads or (1 if not cuda else torch.get_num_threads())
    cfgs = {
        "alibi": SlideEncoder.from_config(a.alibi_config).config,
        "longnet": SlideEncoder.from_config(a.longnet_config).config,
    }
    ns = [int(x) for x in a.ns.split(",")]
    results: dict[str, dict[str, dict]] = {p: {} for p in paths}
    for n in ns:
        for p in paths:
            model, backend = PATHS[p]
            est = estimate_gb(model, backend, n, cfgs[model])
            if n > max_n:
                results[p][str(n)] = {"skipped": f"N > --max-n {max_n}"}
            elif est > cap:
                results[p][str(n)] = {
                    "skipped": f"estimated {est:.1f} GB > cap {cap:.1f} GB (N×N bias/scores)"
                }
            else:
                spec = dict(
                    model=model,
                    backend=backend,
                    n=n,
                    device=a.device,
                    threads=threads,
                    repeats=a.repeats,
                    alibi_config=a.alibi_config,
                    longnet_config=a.longnet_config,
                )
                results[p][str(n)] = measure(spec)
            print(f"{p:>22} N={n:>6}: {results[p][str(n)]}", file=sys.stderr, flush=True)

    def ok(p: str) -> dict[int, dict]:
        return {int(n): r for n, r in results.get(p, {}).items() if "peak_mem_mb" in r}

    exponents = {p: slope([(n, r["peak_mem_mb"]) for n, r in ok(p).items()]) for p in paths}
    ratios = {}
    mat = ok("alibi_materialised")
    for p in ("alibi_blockwise_sdpa", "alibi_flex", "alibi_xformers"):
        both = sorted(set(ok(p)) & set(mat))
        ratios[p] = {
            str(n): {
                "memory": ok(p)[n]["peak_mem_mb"] / max(mat[n]["peak_mem_mb"], 1e-9),
                "time": ok(p)[n]["time_s"] / mat[n]["time_s"],
            }
            for n in both
        }
    common = sorted(set(ok("longnet_sdpa")) & set(ok("alibi_blockwise_sdpa")))
    longnet_vs_full = None
    if common:
        n = common[-1]
        longnet_vs_full = {
            "n": n,
            "time_ratio": ok("longnet_sdpa")[n]["time_s"] / ok("alibi_blockwise_sdpa")[n]["time_s"],
        }
    out = {
        "benchmark": "slide_encoder_forward",
        "device": a.device,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "threads": threads,
        "torch": torch.__version__,
        "memory_method": "cuda max_memory_allocated" if cuda else "fresh process, VmHWM-VmRSS",
        "configs": {
            "alibi": dataclasses_dict(cfgs["alibi"]),
            "longnet": dataclasses_dict(cfgs["longnet"]),
        },
        "results": results,
        "memory_growth_exponent": exponents,
        "target_exponent_max": 1.1,
        "blockwise_over_materialised": ratios,
        "longnet_over_full_time": longnet_vs_full,
        "note": "random weights; batch of one slide; time = best of --repeats after a warm-up"
        + (
            "; CPU flex: torch's compiled CPU FlexAttention allocates an L×L float buffer "
            "(quadratic memory), and lengths are bucketed up to 25 % (see attention.py)"
            if not cuda
            else ""
        ),
    }
    print(json.dumps(out, indent=2))


def dataclasses_dict(cfg) -> dict:
    keep = ("name", "d_model", "depth", "num_heads", "input_dim", "position", "attention")
    d = {k: getattr(cfg, k) for k in keep}
    if cfg.attention == "dilated":
        d["segment_lengths"], d["dilation_ratios"] = cfg.segment_lengths, cfg.dilation_ratios
    return d


if __name__ == "__main__":
    main()
