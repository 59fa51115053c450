"""encode-slides end to end on real slides: schema, bad slides, missing mpp, kill and resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from slidefm.cli import main
from slidefm.io.features import is_complete, read_attrs, read_features

FAST = [
    "--encoder",
    "vit_tiny_dev",
    "--weights",
    "random",
    "--num-workers",
    "1",
    "--batch-size",
    "16",
    "--no-progress",
]


def test_encode_real_slide_schema(sample_slide, tmp_path):
    rc = main(["encode-slides", str(sample_slide), "--out", str(tmp_path), *FAST, "--seed", "7"])
    assert rc == 0
    h5 = tmp_path / "CMU-1-Small-Region.h5"
    assert is_complete(h5)
    with h5py.File(h5, "r") as f:
        n = f["coords"].shape[0]
        assert f["features"].shape == (n, 192) and n > 20
        assert f.attrs["encoder_weights"] == "random" and f.attrs["seed"] == 7
        assert f.attrs["level0_mpp"] == pytest.approx(0.499) and f.attrs["target_mpp"] == 0.5
        assert f.attrs["patch_size_level0"] == round(256 * 0.5 / 0.499)
        coords, grid = f["coords"][()], f["grid"][()]
        # Border tiles are kept padded (default border_tiles: pad): each starts inside the slide.
        assert (coords < [f.attrs["level0_width"], f.attrs["level0_height"]]).all()
        np.testing.assert_array_equal(
            grid, (coords - coords.min(0)) // f.attrs["patch_size_level0"]
        )
        assert np.isfinite(f["features"][()]).all()
    assert (tmp_path / "qc" / "CMU-1-Small-Region.png").is_file()
    # Resume: same config → skipped; changed config → re-encoded.
    before = h5.stat().st_mtime_ns
    assert (
        main(["encode-slides", str(sample_slide), "--out", str(tmp_path), *FAST, "--seed", "7"])
        == 0
    )
    assert h5.stat().st_mtime_ns == before
    # Changed config into the same folder: refused (nothing rewritten) unless --overwrite.
    argv = ["encode-slides", str(sample_slide), "--out", str(tmp_path), *FAST, "--seed", "7"]
    assert main([*argv, "--min-tissue", "0.5"]) == 2
    assert h5.stat().st_mtime_ns == before
    assert main([*argv, "--min-tissue", "0.5", "--overwrite"]) == 0
    assert h5.stat().st_mtime_ns != before and read_attrs(h5)["config_hash"] != ""


def test_bad_slides_do_not_stop_the_cohort(slides_dir, sample_slide, tmp_path, capsys):
    cohort = tmp_path / "in"
    cohort.mkdir()
    for name in ("broken.svs", "fixtures/unreadable.svs", "TCGA-CR-7395-01A-01-TS1.svs"):
        shutil.copy(slides_dir / name, cohort / Path(name).name)
    shutil.copy(sample_slide, cohort / "good.svs")
    out = tmp_path / "out"
    rc = main(["encode-slides", str(cohort), "--out", str(out), *FAST])
    assert rc == 1
    errors = pd.read_csv(out / "errors.csv").set_index("slide_id")
    assert set(errors.index) == {"broken", "unreadable", "TCGA-CR-7395-01A-01-TS1"}
    assert "--mpp" in errors.loc["TCGA-CR-7395-01A-01-TS1", "error"]
    assert "cannot open" in errors.loc["broken", "error"]
    assert is_complete(out / "good.h5")
    assert "FAILED broken" in capsys.readouterr().out
    # The slide without metadata succeeds once the user gives --mpp (via a manifest column).
    man = tmp_path / "m.csv"
    pd.DataFrame(
        {"slide_id": ["tcga"], "path": [str(cohort / "TCGA-CR-7395-01A-01-TS1.svs")], "mpp": [0.5]}
    ).to_csv(man, index=False)
    assert main(["encode-slides", "--manifest", str(man), "--out", str(out), *FAST]) == 0
    assert read_attrs(out / "tcga.h5")["mpp_source"] == "override"


def test_shards_partition_the_cohort(sample_slide, tmp_path):
    cohort = tmp_path / "in"
    cohort.mkdir()
    for i in range(3):
        os.symlink(sample_slide, cohort / f"s{i}.svs")
    from slidefm.wsi.jobs import collect_slides, shard

    jobs = collect_slides([str(cohort)])
    parts = [[j.slide_id for j in shard(jobs, 2, i)] for i in range(2)]
    assert sorted(parts[0] + parts[1]) == ["s0", "s1", "s2"] and not set(parts[0]) & set(parts[1])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_and_resume(sample_slide, tmp_path, sig):
    cohort, out = tmp_path / "in", tmp_path / "out"
    cohort.mkdir()
    n = 12
    for i in range(n):
        os.symlink(sample_slide, cohort / f"s{i}.svs")
    cmd = [
        sys.executable,
        "-m",
        "slidefm.cli",
        "encode-slides",
        str(cohort),
        "--out",
        str(out),
        *FAST,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob("s*.h5")):
        time.sleep(0.05)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert rc != 0
    finals = sorted(out.glob("s*.h5"))
    assert 1 <= len(finals) < n
    for p in finals:
        assert is_complete(p)
        read_features(p)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert all(is_complete(out / f"s{i}.h5") for i in range(n))
    assert not [p for p in out.rglob(".*tmp-*")]
