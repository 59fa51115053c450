"""A built wheel works without the checkout: configs and prompts ship as package data.

The wheel is built from a copy of the package sources (so the checkout gets no build/ or
egg-info), installed with ``--no-deps`` into a fresh venv that borrows the test interpreter's
site-packages for torch & co. (nothing is downloaded), and run from a folder outside the repo
with no PYTHONPATH: ``--config tiny`` and ``--prompts <name>`` must resolve inside the install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from bag_utils import write_random_bags

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(venv python, environment) of a fresh venv holding only the slidefm wheel."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    # symlinks=True: slidefm/configs stays a link to configs/, exactly as in the checkout.
    shutil.copytree(REPO / "slidefm", src / "slidefm", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(REPO / "configs", src / "configs")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(wheels), str(src)], root, env)  # fmt: skip
    (wheel,) = wheels.glob("slidefm-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    py = venv / "bin" / "python"
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root, env
        ).stdout.strip()
    )
    # Dependencies come from the test interpreter's site-packages, appended after the venv's
    # own (a plain path line: that folder's .pth files, e.g. an editable slidefm, stay inactive).
    (site / "borrowed_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
          str(wheel)], root, env)  # fmt: skip
    return py, env


def data_files(pkg: Path) -> list[str]:
    """Every non-Python file under ``pkg`` (links followed: ``slidefm/configs``), relative."""
    found = []
    for root, dirs, files in os.walk(pkg, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [str((Path(root) / f).relative_to(pkg)) for f in files if not f.endswith(".py")]
    return sorted(found)


def test_wheel_holds_every_data_file(installed, tmp_path):
    """Configs, prompts, the viewer's static files, py.typed: all of the checkout's non-Python
    files under slidefm/ are in the install, and the configs are found there."""
    py, env = installed
    code = (
        "import slidefm, slidefm.config as c; from pathlib import Path; "
        "print(Path(slidefm.__file__).parent); print(c.CONFIG_DIR)"
    )
    pkg, cfg_dir = _run([str(py), "-c", code], tmp_path, env).stdout.split()
    assert REPO not in Path(pkg).parents and Path(pkg).parent.name == "site-packages"
    assert Path(cfg_dir) == Path(pkg) / "configs"
    expected = data_files(REPO / "slidefm")
    assert any(f.startswith("configs/prompts/") for f in expected) and "py.typed" in expected
    assert data_files(Path(pkg)) == expected


def test_installed_cli_pretrains_tiny_from_outside_the_repo(installed, tmp_path):
    py, env = installed
    feats = tmp_path / "feats"
    feats.mkdir()
    write_random_bags(feats, num=6, dim=16, n_range=(20, 40), side=8)
    out = tmp_path / "pre"
    overrides = ["train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2",
                 "train.ckpt_every=2", "train.progress=false", "data.batch_size=2"]  # fmt: skip
    cmd = [str(py.parent / "slidefm"), "pretrain", "--config", "tiny",
           "--features", str(feats), "--out", str(out)]  # fmt: skip
    cmd += [x for o in overrides for x in ("--set", o)]
    r = _run(cmd, tmp_path, {**env, "OMP_NUM_THREADS": "1"})
    assert "pretrained 2 steps" in r.stdout
    assert (out / "encoder.pt").is_file()
    # A prompt set by bare name and by its repository path, from outside the repo.
    code = (
        "from slidefm.eval.zero_shot import load_prompts as lp; "
        "a = lp('synthetic_subtypes'); b = lp('configs/prompts/synthetic_subtypes.yaml'); "
        "assert a.classes == b.classes and len(a.classes) == 4, a.classes; print('ok')"
    )
    assert _run([str(py), "-c", code], tmp_path, env).stdout.strip() == "ok"
