"""``slidefm pretrain-tiles`` end to end: exact resume, export loadable by ``encode-slides``
(recorded by sha256), bad input; and ``probe-tiles`` on planted features."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from slidefm.cli import main
from slidefm.eval.protocol import patient_split
from slidefm.eval.tile_probes import run_probe_tiles
from slidefm.io.features import SlideFeatures, read_attrs, write_features
from slidefm.train.tile_ssl import run_pretrain_tiles
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.synthetic import generate_cohort
from slidefm.wsi.synthetic_tiff import write_pyramid_tiff

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [
    "patches.patch_size=40",
    "patches.mpps=[0.5, 1.0]",
    "patches.samples_per_epoch=12",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.n_local=2",
    "ssl.out_dim=32",
    "ssl.hidden_dim=32",
    "ssl.bottleneck_dim=16",
    "data.batch_size=4",
    "data.num_workers=0",
    "eval.n_tiles=16",
    "eval.max_labelled=40",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptiles")
    man = generate_cohort(out, 3, seed=1, workers=1, progress=False, cells=6, cell_px=256)
    return out, [SlideJob(r.slide_id, str(out / r.path)) for r in man.itertuples()]


def test_resume_is_exact_and_export_loads_in_encode_slides(cohort, tmp_path):
    out, jobs = cohort
    ov = [*TINY, f"eval.labels={out / 'cells.csv'}"]
    full = run_pretrain_tiles(
        jobs, "vit_tiny_dev", "random", tmp_path / "a", "synthetic_cpu", ov, 3
    )
    assert full["steps"] == 4 and "knn20_bacc" in full["final"]
    assert {"rankme", "odcorr"} <= set(full["step0_eval"])
    part = run_pretrain_tiles(
        jobs, "vit_tiny_dev", "random", tmp_path / "b", "synthetic_cpu", ov, 3, stop_at_step=2
    )
    assert part["steps"] == 2 and not (tmp_path / "b" / "tile_encoder.safetensors").exists()
    run_pretrain_tiles(jobs, "vit_tiny_dev", "random", tmp_path / "b", "synthetic_cpu", ov, 3)
    wa = load_file(tmp_path / "a" / "tile_encoder.safetensors")
    wb = load_file(tmp_path / "b" / "tile_encoder.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    meta = json.loads((tmp_path / "a" / "tile_encoder.json").read_text())
    assert meta["registry_name"] == "vit_tiny_dev" and meta["steps"] == 4
    assert meta["source_weights"] == "random" and meta["seed"] == 3 and meta["input_size"] == 112
    w = tmp_path / "a" / "tile_encoder.safetensors"
    rc = main(
        [
            "encode-slides",
            jobs[0].path,
            "--out",
            str(tmp_path / "f"),
            "--encoder",
            "vit_tiny_dev",
            "--weights",
            str(w),
            "--no-qc",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    attrs = read_attrs(tmp_path / "f" / f"{jobs[0].slide_id}.h5")
    assert attrs["encoder_weights"] == f"tile_encoder.safetensors@sha256:{meta['sha256']}"


def test_bad_slides_skipped_and_none_usable_fails(cohort, tmp_path, capsys):
    out, jobs = cohort
    blank = tmp_path / "blank.tiff"
    write_pyramid_tiff(blank, np.full((512, 512, 3), 245, np.uint8))
    ov = [*TINY, "train.max_steps=1"]
    info = run_pretrain_tiles(
        [SlideJob("blank", str(blank)), jobs[0]],
        "vit_tiny_dev",
        "random",
        tmp_path / "r",
        "synthetic_cpu",
        ov,
    )
    assert info["skipped_slides"] == [{"slide_id": "blank", "reason": "no tissue detected"}]
    assert "skipped slide blank: no tissue detected" in capsys.readouterr().err
    rc = main(
        [
            "pretrain-tiles",
            str(blank),
            "--encoder",
            "vit_tiny_dev",
            "--out",
            str(tmp_path / "n"),
            "--config",
            "synthetic_cpu",
        ]
    )
    assert rc == 2
    assert "no usable slide" in capsys.readouterr().err


def test_probe_tiles_same_splits_and_planted_signal(tmp_path):
    rng = np.random.default_rng(0)
    slides, cells = [], []
    for i in range(12):
        sid = f"S{i:02d}"
        slides.append({"slide_id": sid, "case_id": f"C{i // 2}", "split": "test"})
        coords = np.array([(x * 256, y * 256) for x in range(6) for y in range(6)], np.int64)
        lab = rng.integers(0, 3, len(coords))
        cells += [(sid, x, y, ["a", "b", "c"][k]) for (x, y), k in zip(coords, lab)]
        centroids = np.eye(3, 8) * 4
        good = centroids[lab] + rng.normal(size=(len(lab), 8))
        for name, f in (("good", good), ("noise", rng.normal(size=(len(lab), 8)))):
            write_features(
                tmp_path / name / f"{sid}.h5",
                SlideFeatures(
                    sid,
                    f.astype(np.float32),
                    coords,
                    coords // 256,
                    np.ones(len(coords), np.float32),
                    {
                        "encoder_weights": name,
                        "encoder": name,
                        "target_mpp": 0.5,
                        "patch_size": 256,
                        "patch_size_level0": 256,
                        "config_hash": "x",
                        "seed": 0,
                    },
                ),
            )
    pd.DataFrame(slides).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(cells, columns=["slide_id", "x", "y", "cell_type"]).to_csv(
        tmp_path / "c.csv", index=False
    )
    feats = {n: str(tmp_path / n) for n in ("good", "noise")}
    t = run_probe_tiles(
        feats,
        str(tmp_path / "c.csv"),
        str(tmp_path / "m.csv"),
        tmp_path / "o",
        splits=("test",),
        seeds=(0, 1),
    )
    m = t.groupby(["encoder", "probe"])["bacc"].mean()
    for p in ("linear", "knn20", "5shot", "5shot_linear"):
        assert m["good", p] > 0.9 and m["noise", p] < 0.5, p
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["encoders"]["good"]["encoder_weights"] == "good"
    cases = np.repeat([f"C{i}" for i in range(10)], 3)
    part = patient_split(cases, 0)
    assert all(len(set(part[cases == c])) == 1 for c in set(cases))
    assert set(part) == {"train", "val", "test"}
    assert (patient_split(cases, 0) == part).all()


@pytest.mark.slow
def test_example_quick_runs_end_to_end(tmp_path):
    """examples/pretrain_tiles.py --quick: cohort → SSL → encode (trained and random) → probes."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        str(repo / "examples" / "pretrain_tiles.py"),
        "--out",
        str(tmp_path),
        "--quick",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for kind in ("random", "ssl"):
        probes = res["probes_balanced_accuracy"][kind]
        assert {"linear", "knn20", "1shot"} <= set(probes)
        assert all(0.0 <= v["mean"] <= 1.0 for v in probes.values())
    run = res["ssl_runs"]["0"]
    assert run["steps"] == 3 and {"rankme", "odcorr"} <= set(run["step0"])
