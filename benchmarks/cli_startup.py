"""CLI start-up: wall and CPU seconds of ``slidefm --help`` and of every command's ``--help``
against the 1 s budget, side by side with an eager start (the same parser after importing
torch + timm + pandas, what every call paid before the pipelines imported them lazily).

    python benchmarks/cli_startup.py --repeats 3

Each measurement is a fresh interpreter (``python -m slidefm.cli ... --help``); the median of
``--repeats`` runs is reported. CPU seconds are the child's user + system time, robust to a
busy machine; wall seconds are what a user waits. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 1.0
EAGER = "import torch, timm, pandas; import runpy, sys; sys.argv = ['slidefm', '--help']; " \
        "runpy.run_module('slidefm.cli', run_name='__main__')"  # fmt: skip


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _median(cmd: list[str], env: dict[str, str], repeats: int) -> dict[str, float]:
    runs = [_timed(cmd, env) for _ in range(repeats)]
    return {
        "wall_s": round(statistics.median(w for w, _ in runs), 3),
        "cpu_s": round(statistics.median(c for _, c in runs), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sys.path.insert(0, str(REPO))
    from slidefm.cli import build_parser, iter_commands

    py = [sys.executable, "-m", "slidefm.cli"]
    per_command = {
        " ".join(p) or "slidefm": _median([*py, *p, "--help"], env, args.repeats)
        for p in iter_commands(build_parser())
    }
    top = per_command["slidefm"]
    eager = _median([sys.executable, "-c", EAGER], env, args.repeats)
    worst = max(per_command.values(), key=lambda m: m["wall_s"])
    print(
        json.dumps(
            {
                "budget_s": BUDGET_S,
                "slidefm_help": top,
                "eager_slidefm_help": eager,
                "eager_over_lazy_wall": round(eager["wall_s"] / top["wall_s"], 1),
                "eager_over_lazy_cpu": round(eager["cpu_s"] / top["cpu_s"], 1),
                "worst_command_wall_s": worst["wall_s"],
                "worst_over_budget": round(worst["wall_s"] / BUDGET_S, 2),
                "within_budget": all(m["wall_s"] < BUDGET_S for m in per_command.values()),
                "per_command": per_command,
                "repeats": args.repeats,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
