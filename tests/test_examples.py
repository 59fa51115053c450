"""The runnable examples stay runnable (slow: each runs the real CLI end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mil_biomarker_example_on_the_toy_cohort(tmp_path):
    """Feature-level toy cohort → ABMIL and a slide encoder pretrained on it: the JSON summary
    covers every (label, model) run, and only the grid-aware model reads the spatial label."""
    cmd = [
        sys.executable,
        str(REPO / "examples" / "mil_biomarker.py"),
        "--out",
        str(tmp_path),
        "--toy",
        "40",
        "--folds",
        "3",
        "--epochs",
        "3",
        "--models",
        "abmil",
        "--slide-encoder",
        "pretrain",
        "--pretrain-config",
        "tiny",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index('{\n  "cohort"') :])
    assert set(summary["runs"]) == {
        f"{label}/{model}"
        for label in ("biomarker_bag", "biomarker_spatial")
        for model in ("abmil", "slide_encoder")
    }
    spatial = summary["runs"]["biomarker_spatial/slide_encoder"]["auroc"]
    assert spatial[1] > 0.6  # CI lower bound above chance: the encoder sees the arrangement
    for run in summary["runs"].values():
        value, lo, hi = run["auroc"]
        assert lo <= value <= hi


@pytest.mark.slow
def test_zero_shot_example_quick(tmp_path):
    """``examples/zero_shot.py --quick``: every step of the vision–language example runs (tiny
    cohort, few steps) and the summary records both runs, with their CIs and a chance line."""
    cmd = [sys.executable, str(REPO / "examples" / "zero_shot.py"), "--out", str(tmp_path / "vl"),
           "--quick", "--workers", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout and "expected" not in proc.stdout  # no claim for a smoke run
    summary = json.loads((tmp_path / "vl" / "zero_shot" / "summary.json").read_text())
    for run in ("pretrained", "random_encoder"):
        ba = summary[run]["balanced_accuracy"]
        assert ba["lo"] <= ba["value"] <= ba["hi"]
    assert (tmp_path / "vl" / "zero_shot" / "summary.png").stat().st_size > 5000
    info = json.loads((tmp_path / "vl" / "align" / "run_config.json").read_text())
    assert info["selected"]["metric"] == "val_same_label_mass"  # the step was chosen on val


@pytest.mark.slow
def test_mil_biomarker_example_quick(tmp_path):
    cmd = [sys.executable, str(REPO / "examples" / "mil_biomarker.py"), "--out", str(tmp_path),
           "--quick", "--models", "abmil"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index('{\n  "cohort"') :])
    assert set(summary["runs"]) == {"biomarker_bag/abmil", "biomarker_spatial/abmil"}
    assert summary["runs"]["biomarker_bag/abmil"]["folds"] == 3


@pytest.mark.slow
def test_survival_example_quick(tmp_path):
    """--quick: tiny synthetic slides → encode → pretrain → Cox probes on the pretrained, the
    random-weight and the mean-pooled embeddings, the shuffled-follow-up control and one MIL
    model; the JSON summary has every run with a C-index inside its CI, and the ground-truth
    C-index recomputed from the cohort's survival.csv."""
    cmd = [sys.executable, str(REPO / "examples" / "survival.py"), "--out", str(tmp_path)]
    cmd += ["--quick", "--n-boot", "100", "--mil", "abmil"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path
    )  # ~2.5 min alone; generous on a shared CPU
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index('{\n  "cohort"') :])
    want = {"slide_encoder", "slide_encoder_random_weights", "mean_pool", "mil_abmil"}
    assert set(summary["runs"]) == want | {"slide_encoder__shuffled_follow_up"}
    for run in summary["runs"].values():
        value, lo, hi = run["c_index"]
        assert lo <= value <= hi and run["events"] > 0
    assert len(summary["runs"]["slide_encoder"]["logrank_p"]) == 3  # one per CV seed
    assert 0.5 < summary["ground_truth_c_index"]["true_risk"] <= 1.0
