"""encode-slides under bad input and hostile disks (issues 17 and 18): truncated slides,
unsafe slide ids, unwritable / full output folders, bad options, replaced slides, lost QC
images, re-runs with other options, border tiles."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from slidefm.cli import main
from slidefm.io.features import is_complete, read_attrs
from slidefm.wsi.reader import SlideReader, SlideReadError

FAST = ["--encoder", "vit_tiny_dev", "--weights", "random", "--num-workers", "0"]
FAST += ["--batch-size", "32", "--no-progress"]


def _encode(*argv: str) -> int:
    return main(["encode-slides", *argv, *FAST])


def _cohort(tmp_path: Path, sample_slide: Path, n: int = 2) -> Path:
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    for i in range(n):
        shutil.copy(sample_slide, d / f"s{i}.svs")
    return d


# -- 6: truncated slides -------------------------------------------------------------------
def test_truncated_svs_tiles_proved_complete_and_recorded(sample_slide, tmp_path):
    """Cut at 70 %: only the directory chain after the image data is lost; every level-0
    tile (checked here from tifffile's offsets) lies inside the file, so encoding may go on,
    and the feature file says why the file was accepted."""
    cut = tmp_path / "cut.svs"
    cut.write_bytes(sample_slide.read_bytes()[: int(sample_slide.stat().st_size * 0.7)])
    with tifffile.TiffFile(cut) as tf:
        page = tf.pages[0]
        assert (np.add(page.dataoffsets, page.databytecounts) <= cut.stat().st_size).all()
    assert _encode(str(cut), "--out", str(tmp_path / "o"), "--no-qc") == 0
    assert "pixels read are complete" in read_attrs(tmp_path / "o" / "cut.h5")["source_integrity"]


def test_truncated_tiff_missing_tiles_is_failed(tmp_path, capsys):
    """A tiled TIFF whose directory is at the front, cut at 70 %: tiles beyond the end of the
    file would be read as zeros by tifffile; the slide must be reported as failed."""
    path = tmp_path / "front.tif"
    img = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), np.uint8)
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        compression="zlib",
    )
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(SlideReadError, match="beyond the end of the file"):
        SlideReader(path, backend="tiffslide")
    assert _encode(str(path), "--out", str(tmp_path / "o")) == 1
    err = pd.read_csv(tmp_path / "o" / "errors.csv")
    assert list(err.slide_id) == ["front"]


# -- 7: slide ids --------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "ABSOLUTE", ".hidden"])
def test_unsafe_slide_id_is_refused_naming_the_row(sample_slide, tmp_path, capsys, bad):
    victim = tmp_path / "victim"
    victim.mkdir()
    if bad == "ABSOLUTE":
        bad = str(victim / "abs_slide")
    man = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ["ok", bad], "path": [str(sample_slide)] * 2}).to_csv(
        man, index=False
    )
    out = tmp_path / "sub" / "out"
    assert _encode("--manifest", str(man), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "row 3" in err and repr(bad) in err and "safe file name" in err
    assert not list(tmp_path.rglob("*.h5"))  # nothing written, inside or outside --out


# -- 8: output folder ----------------------------------------------------------------------
def test_out_is_a_file_is_one_line(sample_slide, tmp_path, capsys):
    # A read-only --out is tested with an injected EROFS below: CI runs as root, which ignores
    # permission bits, so a chmod-based test could never fail there.
    f = tmp_path / "file"
    f.write_text("x")
    assert _encode(str(sample_slide), "--out", str(f)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_read_only_probe_runs_before_any_slide(sample_slide, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so fake EROFS on the first write into --out."""
    import slidefm.encoders.cohort as enc

    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(enc, "atomic_path", boom)
    monkeypatch.setattr(enc, "encode_slide", lambda *a, **k: pytest.fail("slide read"))
    assert _encode(str(sample_slide), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Read-only file system" in err and err.count("\n") == 1


def test_full_disk_names_the_lost_slide_and_keeps_complete_ones(
    sample_slide, tmp_path, capsys, monkeypatch
):
    import slidefm.io.features as features_io  # encode imports it when a slide is encoded

    real = features_io.write_features

    def write(path, sf):
        if sf.slide_id == "s1":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, sf)

    monkeypatch.setattr(features_io, "write_features", write)
    cohort, out = _cohort(tmp_path, sample_slide, 3), tmp_path / "out"
    assert _encode(str(cohort), "--out", str(out)) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "disk full" in line and "s1 was NOT written" in line
    assert is_complete(out / "s0.h5") and not (out / "s1.h5").exists()
    assert not (out / "s2.h5").exists()  # the run stopped instead of failing every slide
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.slide_id) == ["s1"]  # s0 is complete, never listed as failed


def test_full_disk_on_qc_keeps_the_slide_done(sample_slide, tmp_path, capsys, monkeypatch):
    import slidefm.wsi.qc as qc_module  # encode imports it when a slide is encoded

    def qc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qc_module, "save_qc", qc)
    out = tmp_path / "out"
    assert _encode(str(sample_slide), "--out", str(out)) == 2
    assert "features are complete but its QC image is not" in capsys.readouterr().err
    assert is_complete(out / "CMU-1-Small-Region.h5")
    assert pd.read_csv(out / "errors.csv").empty


# -- 9: options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--feature-dtype", "int8"], ["--feature-dtype", "float16"]),
        (["--stain-norm", "reinhard"], ["--stain-norm", "macenko"]),
        (["--batch-size", "0"], ["--batch-size", "positive"]),
        (["--tissue", "dark"], ["--tissue", "fluorescence"]),
    ],
)
def test_bad_flags_fail_at_parse_time(sample_slide, tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["encode-slides", str(sample_slide), "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words)


@pytest.mark.parametrize(
    "sets, words",
    [
        (["patch_size=abc"], ["patch_size", "int", "'abc'"]),
        (["batch_size=0"], ["batch_size", "> 0"]),
        (["feature_dtype=int8"], ["feature_dtype", "float32, float16"]),
        (["stain_norm=x"], ["stain_norm", "none, macenko"]),
        (["tissue.mode=x"], ["tissue", "brightfield"]),
        (["border_tiles=mirror"], ["border_tiles", "drop, pad"]),
    ],
)
def test_bad_config_values_are_one_line(sample_slide, tmp_path, capsys, sets, words):
    argv = [str(sample_slide), "--out", str(tmp_path / "o")]
    assert _encode(*argv, *[a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_non_yaml_config_is_a_config_error(sample_slide, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder: [unclosed\n  : : :\n")
    assert _encode(str(sample_slide), "--out", str(tmp_path / "o"), "--config", str(bad)) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "line" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["abc", "NaN", "-1", "0"])
def test_bad_manifest_mpp_names_row_and_column(sample_slide, tmp_path, capsys, value):
    man = tmp_path / "m.csv"
    man.write_text(f"slide_id,path,mpp\na,{sample_slide},0.5\nb,{sample_slide},{value}\n")
    assert _encode("--manifest", str(man), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "row 3" in err and "'mpp'" in err and repr(value) in err


# -- 10: replaced slide, runtime in hash ---------------------------------------------------
def test_replaced_slide_is_re_encoded(sample_slide, slides_dir, tmp_path):
    cohort, out = _cohort(tmp_path, sample_slide, 1), tmp_path / "out"
    assert _encode(str(cohort), "--out", str(out)) == 0
    n0 = h5py.File(out / "s0.h5")["coords"].shape[0]
    # Another slide (TCGA, given its µm/px through --mpp... here: same options, other file).
    shutil.copy(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", cohort / "s0.svs")
    assert _encode(str(cohort), "--out", str(out), "--mpp", "0.499", "--overwrite") == 0
    a = read_attrs(out / "s0.h5")
    assert a["source_size"] == (cohort / "s0.svs").stat().st_size
    assert h5py.File(out / "s0.h5")["coords"].shape[0] != n0


def test_same_name_same_options_new_bytes_is_re_encoded(sample_slide, tmp_path):
    cohort, out = _cohort(tmp_path, sample_slide, 1), tmp_path / "out"
    assert _encode(str(cohort), "--out", str(out)) == 0
    before = (out / "s0.h5").stat().st_mtime_ns
    os.utime(cohort / "s0.svs", ns=(1, 1))  # "replaced": same size, other mtime
    assert _encode(str(cohort), "--out", str(out)) == 0
    assert (out / "s0.h5").stat().st_mtime_ns != before
    assert read_attrs(out / "s0.h5")["source_mtime_ns"] == 1


def test_device_and_precision_are_in_the_skip_hash():
    from slidefm.encoders.encode_config import EncodeConfig, slide_hash
    from slidefm.wsi.jobs import SlideJob

    cfg, job = EncodeConfig(), SlideJob("a", "a.svs")
    h = {
        slide_hash(cfg, job, 0, {"device": d, "precision": p})
        for d, p in [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")]
    }
    assert len(h) == 4


# -- 11: QC ----------------------------------------------------------------------------------
def test_lost_qc_png_is_redrawn_on_resume(sample_slide, tmp_path):
    out = tmp_path / "out"
    assert _encode(str(sample_slide), "--out", str(out)) == 0
    qc = out / "qc" / "CMU-1-Small-Region.png"
    first = np.asarray(Image.open(qc))
    qc.unlink()
    h5_mtime = (out / "CMU-1-Small-Region.h5").stat().st_mtime_ns
    assert _encode(str(sample_slide), "--out", str(out)) == 0
    assert (out / "CMU-1-Small-Region.h5").stat().st_mtime_ns == h5_mtime  # not re-encoded
    again = np.asarray(Image.open(qc))
    assert again.shape == first.shape and np.abs(again.astype(int) - first).mean() < 1.0


def test_qc_has_header_and_scale_bar(sample_slide, tmp_path):
    out = tmp_path / "out"
    assert _encode(str(sample_slide), "--out", str(out)) == 0
    img = np.asarray(Image.open(out / "qc" / "CMU-1-Small-Region.png").convert("RGB"))
    with SlideReader(sample_slide) as r:
        thumb_h = r.thumbnail(1024)[0].shape[0]
    head = img.shape[0] - thumb_h
    assert head > 30  # a header band above the thumbnail ...
    assert (img[:head].min(axis=2) < 80).mean() > 0.005  # ... with dark text on it
    # The scale bar: a solid black run of the expected length in the bottom-left corner.
    from slidefm.wsi.qc import scale_bar_um

    um_px = r.info.width / img.shape[1] * 0.499
    um = scale_bar_um(img.shape[1], um_px)
    rows = (img[-80:, : img.shape[1] // 2].max(axis=2) < 30).sum(axis=1)
    assert abs(rows.max() - um / um_px) <= 3


def test_no_tissue_slide_gets_a_qc_png(tmp_path, capsys):
    blank = tmp_path / "blank.tif"
    img = np.full((2048, 2048, 3), 245, np.uint8)
    tifffile.imwrite(
        blank, img, tile=(256, 256), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER"
    )
    out = tmp_path / "out"
    assert _encode(str(blank), "--out", str(out), "--tissue", "brightfield") == 1
    qc = out / "qc" / "blank.png"
    assert qc.is_file()
    err = pd.read_csv(out / "errors.csv").set_index("slide_id").loc["blank", "error"]
    assert str(qc) in err


# -- 12: re-runs and run records -----------------------------------------------------------
def test_other_options_refused_and_run_records_accumulate(sample_slide, tmp_path, capsys):
    out = tmp_path / "out"
    assert _encode(str(sample_slide), "--out", str(out)) == 0
    h5 = out / "CMU-1-Small-Region.h5"
    before = h5.stat().st_mtime_ns
    assert _encode(str(sample_slide), "--out", str(out), "--min-tissue", "0.6") == 2
    assert "--overwrite" in capsys.readouterr().err and h5.stat().st_mtime_ns == before
    assert _encode(str(sample_slide), "--out", str(out), "--min-tissue", "0.6", "--overwrite") == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2  # the refused run wrote nothing; the other two each left a record
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert {s["config"]["min_tissue"] for s in summaries} == {0.1, 0.6}
    assert json.loads((out / "summary.json").read_text())["run_id"] in {r.name for r in runs}


# -- 13: border tiles ------------------------------------------------------------------------
def test_border_tiles_padded_white_or_dropped(sample_slide, tmp_path):
    from slidefm.wsi.patches import TileRegionDataset
    from slidefm.wsi.tiling import make_tile_grid

    with SlideReader(sample_slide) as r:
        w, h, mpp = r.info.width, r.info.height, r.mpp
        mask = np.ones((64, 64), bool)
        sc = max(w, h) / 64
        pad = make_tile_grid(w, h, mpp, mask, sc, 0.5, 256, 0, 0.0, "pad")
        drop = make_tile_grid(w, h, mpp, mask, sc, 0.5, 256, 0, 0.0, "drop")
    ext = pad.extent_level0
    assert (drop.coords + ext <= [w, h]).all() and len(pad) > len(drop)
    partial = np.flatnonzero(((pad.coords + ext) > [w, h]).any(axis=1))
    assert len(partial) == len(pad) - len(drop)
    ds = TileRegionDataset(sample_slide, pad, 0, 1.0, region_tiles=4)
    got = {}
    for i in range(len(ds)):
        idx, tiles = ds[i]
        got.update(zip(idx.tolist(), tiles))
    for i in partial[:4]:
        x, y = pad.coords[i]
        inside_x = int((w - x) / ext * 256)  # output px still inside the slide
        inside_y = int((h - y) / ext * 256)
        tile = got[int(i)]
        outside = np.ones((256, 256), bool)
        outside[: max(0, inside_y - 2), : max(0, inside_x - 2)] = False
        outside[: inside_y + 2, : inside_x + 2] &= False
        assert (tile[outside] == 255).all()  # white, never black
