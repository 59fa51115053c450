"""The HDF5 schema: atomic writes, completeness, plain-h5py readability, foreign files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from slidefm.io.atomic import atomic_path, clean_stale_tmp
from slidefm.io.features import (
    FeatureFileError,
    SlideFeatures,
    grid_from_coords,
    is_complete,
    read_features,
    write_features,
)
from slidefm.io.manifest import ManifestError, read_manifest

ATTRS = dict(
    encoder="x",
    encoder_weights="random",
    target_mpp=0.5,
    patch_size=256,
    patch_size_level0=512,
    config_hash="abc",
    seed=3,
    level0_width=9000,
    level0_height=7000,
    overlap=0,
)


def _sf(n=5, d=4, slide_id="s1"):
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(n) * 512 + 100, np.full(n, 1024 + 100)], 1).astype(np.int64)
    return SlideFeatures(
        slide_id,
        rng.normal(size=(n, d)).astype(np.float32),
        coords,
        grid_from_coords(coords, 512),
        np.ones(n, np.float32),
        dict(ATTRS),
    )


def test_grid_formula():
    coords = np.array([[1000, 2000], [1512, 2000], [2024, 2512]])
    np.testing.assert_array_equal(grid_from_coords(coords, 512), [[0, 0], [1, 0], [2, 1]])


def test_write_read_round_trip_and_plain_h5py(tmp_path):
    sf = _sf()
    p = write_features(tmp_path / "s1.h5", sf)
    assert is_complete(p, "abc") and not is_complete(p, "other")
    with h5py.File(p, "r") as f:  # plain h5py, by the schema in ARCHITECTURE.md
        assert (
            f["features"].shape == (5, 4)
            and f["coords"].dtype == np.int64
            and f["grid"].dtype == np.int32
        )
        assert f["tissue_fraction"].dtype == np.float32
        assert (
            f.attrs["schema"] == "slidefm.features"
            and bool(f.attrs["complete"])
            and f.attrs["seed"] == 3
        )
        for k in (
            "patch_size",
            "patch_size_level0",
            "level0_width",
            "level0_height",
            "overlap",
            "name",
        ):
            assert k in f["coords"].attrs  # TRIDENT/CLAM readers
        assert f["coords"].attrs["name"] == "s1"
    back = read_features(p)
    np.testing.assert_array_equal(back.features, sf.features)
    np.testing.assert_array_equal(back.grid, sf.grid)


def test_refuses_nan_features(tmp_path):
    sf = _sf()
    sf.features[2, 1] = np.nan
    with pytest.raises(FeatureFileError, match="NaN"):
        write_features(tmp_path / "s1.h5", sf)
    assert not list(tmp_path.iterdir())


def test_crash_during_write_leaves_no_final_file(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.h5") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_write_never_leaves_incomplete_final_file(tmp_path):
    code = textwrap.dedent(f"""
        import time, numpy as np, h5py
        from slidefm.io.atomic import atomic_path
        with atomic_path({str(tmp_path / "big.h5")!r}) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=np.zeros((1000, 10)))
                f.flush(); print("writing", flush=True); time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "big.h5").exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".big.h5.tmp-")
    assert clean_stale_tmp(tmp_path) == leftovers and not list(tmp_path.iterdir())


def test_incomplete_file_is_not_complete(tmp_path):
    p = tmp_path / "s.h5"
    with h5py.File(p, "w") as f:
        f.attrs["schema"] = "slidefm.features"
        f.create_dataset("features", data=np.zeros((2, 2)))
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    assert not is_complete(p)
    with pytest.raises(FeatureFileError, match="incomplete"):
        read_features(p)


def test_reads_real_foreign_bag(shared_data):
    """MoPaDi's real TCGA bag (feats + coords on a 512-px lattice) reads with grid from coords."""
    sf = read_features(shared_data / "embeddings/mopadi_tcga/TCGA-AD-6964-01Z-00-DX1.h5")
    assert sf.features.shape == (777, 512)
    np.testing.assert_array_equal(sf.grid, (sf.coords - sf.coords.min(0)) // 512)


def test_manifest_errors(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("slide_id,case_id,path,split\na,p1,a.svs,train\na,p2,b.svs,test\n")
    with pytest.raises(ManifestError, match="duplicate slide_id"):
        read_manifest(p)
    p.write_text("slide_id,case_id,path,split\na,p1,a.svs,train\nb,p1,b.svs,test\n")
    with pytest.raises(ManifestError, match="more than one split"):
        read_manifest(p)
    p.write_text("slide_id,path\na,missing.svs\n")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(p, required=("slide_id", "path"), check_paths=True)
    p.write_text("case_id,path\np,a.svs\n")
    with pytest.raises(ManifestError, match="lacks column"):
        read_manifest(p)
