"""The command line itself: every command's ``--help`` renders, and starting the CLI loads none
of the heavy libraries (each pipeline imports them inside the function that runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slidefm.cli import build_parser, iter_commands, main

REPO = Path(__file__).resolve().parent.parent

# Imported by no ``--help``: each costs 0.3–10 s of start-up (torch + timm alone 5–10 s).
HEAVY = (
    "torch",
    "torchvision",
    "timm",
    "open_clip",
    "pandas",
    "h5py",
    "scipy",
    "sklearn",
    "skimage",
    "matplotlib",
    "sentencepiece",
    "openslide",
    "tiffslide",
    "tifffile",
    "huggingface_hub",
    "faiss",
    "qdrant_client",
    "fastapi",
    "uvicorn",
)


# From the parser itself, so a new command is covered without editing this file.
COMMANDS = list(iter_commands(build_parser()))


def test_every_command_is_discovered():
    names = {" ".join(p) for p in COMMANDS}
    for expected in ("mil train", "mil predict", "encoders list", "encode-slides", "align"):
        assert expected in names, names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "slidefm")
def test_help_renders(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: slidefm" + "".join(f" {p}" for p in path)), out[:200]


_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from slidefm.cli import build_parser
parser = build_parser()
argv = json.loads(sys.argv[1])
for path in argv:
    try:
        parser.parse_args([*path, "--help"])
    except SystemExit:
        pass
print(json.dumps({"heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules),
                  "cpu_s": time.process_time()}))
"""


def test_help_loads_no_heavy_module():
    """Every ``--help`` in one fresh interpreter: none of HEAVY is imported, and the whole
    process (interpreter start included) uses well under a second of CPU. CPU time, not wall
    time, so the bound holds on a loaded machine; benchmarks/cli_startup.py reports wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(COMMANDS), json.dumps(HEAVY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["heavy"] == [], f"--help imported {res['heavy']}: import them inside run()"
    assert res["cpu_s"] < 1.0, res
