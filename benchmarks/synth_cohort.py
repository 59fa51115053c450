"""Synthetic cohort generation speed: slides/s for ``generate_cohort`` with 1 and 2 workers,
and where one slide's time goes (layout, pixels, pyramidal TIFF), measured in one run.
CPU seconds per slide are reported too: wall-clock rates depend on how busy the machine is.

    python benchmarks/synth_cohort.py --n-slides 20

Prints JSON. The default slide is 12×12 cells of 256 px (3072×3072 px at 0.5 µm/px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from slidefm.wsi.synthetic import (
    CohortOptions,
    generate_cohort,
    layout_of,
    plan_cohort,
    render_spec,
)
from slidefm.wsi.synthetic_tiff import write_pyramid_tiff


def _cpu() -> float:
    """CPU seconds of this process and its finished children (robust to a busy machine)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def stage_times(n: int, opts: CohortOptions, tmp: Path) -> dict:
    """Median seconds per slide of each stage, one process."""
    specs = plan_cohort(n, seed=123, options=opts)
    t = {"layout": [], "render": [], "tiff": []}
    for s in specs:
        t0 = time.perf_counter()
        layout_of(s, 123, opts)
        t1 = time.perf_counter()
        rgb = render_spec(s, 123, opts)
        t2 = time.perf_counter()
        write_pyramid_tiff(tmp / "x.tiff", rgb, quality=opts.jpeg_quality)
        t3 = time.perf_counter()
        t["layout"].append(t1 - t0)
        t["render"].append(t2 - t1 - (t1 - t0))  # render_spec recomputes the layout
        t["tiff"].append(t3 - t2)
    return {k: round(float(np.median(v)), 4) for k, v in t.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-slides", type=int, default=20)
    ap.add_argument("--cells", type=int, default=12)
    ap.add_argument("--cell-px", type=int, default=256)
    a = ap.parse_args()
    opts = CohortOptions(cells=a.cells, cell_px=a.cell_px)
    res: dict = {
        "slide_px": a.cells * a.cell_px,
        "n_slides": a.n_slides,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "machine": platform.processor() or platform.machine(),
    }
    with tempfile.TemporaryDirectory() as d:
        res["seconds_per_slide_by_stage"] = stage_times(min(5, a.n_slides), opts, Path(d))
        for w in (1, 2):
            out = Path(d) / f"w{w}"
            t0, c0 = time.perf_counter(), _cpu()
            generate_cohort(
                out, a.n_slides, seed=0, workers=w, progress=False, cells=a.cells, cell_px=a.cell_px
            )
            dt, cpu = time.perf_counter() - t0, _cpu() - c0
            size = sum(p.stat().st_size for p in (out / "slides").glob("*.tiff"))
            res[f"workers_{w}"] = {
                "seconds": round(dt, 2),
                "slides_per_s": round(a.n_slides / dt, 3),
                "cpu_seconds_per_slide": round(cpu / a.n_slides, 3),
                "mb_per_slide": round(size / a.n_slides / 1e6, 2),
            }
    res["speedup_2_vs_1_workers"] = round(
        res["workers_2"]["slides_per_s"] / res["workers_1"]["slides_per_s"], 2
    )
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
