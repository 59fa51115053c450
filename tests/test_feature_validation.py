"""Every reader of tile-feature and slide-embedding files applies one rule (issue 17): the same
defect gives the same one-line error naming the file in pretrain, embed-slides, align,
zero-shot / retrieve, mil and heatmap; stored checksums catch flipped bytes; files without
checksums (TRIDENT/CLAM, older slidefm) still read."""

from __future__ import annotations

import types
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from bag_utils import write_random_bags
from train_utils import fast_train, set_args

from slidefm.cli import main
from slidefm.io.embeddings import read_embeddings, write_embeddings
from slidefm.io.features import CHECKSUM_ATTR, checksum, read_features

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 64  # the tiny slide encoder's input_dim
BAD = "bag3"  # the defective file of the cohort (not the first one read)


def _replace(path: Path, name: str, data: np.ndarray, keep_sum: bool = True) -> None:
    """Rewrite dataset ``name`` as a writer that produced ``data`` would have (checksum of the
    new bytes), so the content rule, not the checksum, must catch the defect."""
    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        f.create_dataset(name, data=data)
        for k, v in attrs.items():
            f[name].attrs[k] = v
        if keep_sum:
            f[name].attrs[CHECKSUM_ATTR] = checksum(f[name][()])


def _nan(p: Path) -> None:
    x = read_features(p).features
    x[2, 5] = np.nan
    x[4, 0] = np.inf
    _replace(p, "features", x)


def _zero_tiles(p: Path) -> None:
    _replace(p, "features", np.zeros((0, DIM), np.float32))
    _replace(p, "coords", np.zeros((0, 2), np.int64))
    _replace(p, "grid", np.zeros((0, 2), np.int32))
    _replace(p, "tissue_fraction", np.zeros((0,), np.float32))


def _short_grid(p: Path) -> None:
    _replace(p, "grid", read_features(p).grid[:-3])


def _absurd_grid(p: Path) -> None:
    g = read_features(p).grid.copy()
    g[1] = (1_000_000_000, -7)
    _replace(p, "grid", g)


def _other_encoder(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        f.attrs["encoder"] = "uni_v2"
        f.attrs["encoder_weights"] = "hf:MahmoodLab/UNI2-h"


DEFECTS = {  # name → (tamper, phrase every command's error must contain)
    "nan": (_nan, "NaN/Inf features"),
    "zero_tiles": (_zero_tiles, "no tiles"),
    "short_grid": (_short_grid, "grid"),
    "absurd_grid": (_absurd_grid, "grid values span"),
    "other_encoder": (_other_encoder, "tile encoder uni_v2"),
}


def _cohort(tmp: Path, defect: str) -> tuple[Path, list[str]]:
    d = tmp / "feats"
    ids = write_random_bags(d, num=6, dim=DIM, n_range=(20, 30), side=8, seed=3)
    DEFECTS[defect][0](d / f"{BAD}.h5")
    return d, ids


def _cli(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}, stderr: {err}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err  # one line, no traceback
    return lines[0]


def _pretrain(d, ids, tmp, capsys):
    sets = [*fast_train(2), "data.holdout_fraction=0", "data.crop=null"]
    args = ["pretrain", "--config", "tiny", "--features", str(d), "--out", str(tmp / "pre")]
    return _cli(args + set_args(sets), capsys)


def _embed(d, ids, tmp, capsys):
    args = ["embed-slides", "--config", "tiny", "--weights", "random", "--features", str(d)]
    return _cli(args + ["--out", str(tmp / "e.h5")], capsys)


def _align(d, ids, tmp, capsys):
    m = tmp / "align.csv"
    pd.DataFrame(
        {"slide_id": ids, "case_id": ids, "split": "train", "report": "tumour cells seen."}
    ).to_csv(m, index=False)
    args = ["align", "--config", "tiny", "--features", str(d), "--manifest", str(m)]
    args += ["--slide-encoder", "random:tiny", "--out", str(tmp / "al")]
    return _cli(args + set_args(fast_train(2)), capsys)


def _zero_shot_retrieve(d, ids, tmp, capsys):
    """zero-shot and retrieve both read slides through ``eval.embed.slide_embeddings``."""
    from slidefm.eval.embed import slide_embeddings
    from slidefm.models.slide_encoder import SlideEncoder

    model = types.SimpleNamespace(slide_encoder=SlideEncoder.from_config("tiny", input_dim=DIM))
    with pytest.raises(ValueError) as e:
        slide_embeddings(model, ids, features=d)
    return str(e.value)


def _mil(d, ids, tmp, capsys):
    m = tmp / "mil.csv"
    pd.DataFrame({"slide_id": ids, "case_id": ids, "y": [0, 1] * 3}).to_csv(m, index=False)
    args = ["mil", "train", "--manifest", str(m), "--features", str(d), "--label", "y"]
    return _cli(args + ["--folds", "2", "--out", str(tmp / "mil"), "--no-progress"], capsys)


def _heatmap(d, ids, tmp, capsys):
    from slidefm.models.mil import build_mil_model, save_mil_checkpoint

    meta = {
        "model": "abmil",
        "in_dim": DIM,
        "num_classes": 2,
        "model_kwargs": {"hidden": 8},
        "task": {"labels": ["y"], "classes": ["0", "1"], "multilabel": False},
        "features": {"encoder": "random", "encoder_weights": "random"},
    }
    torch.manual_seed(0)
    ckpt = save_mil_checkpoint(tmp / "m.pt", build_mil_model("abmil", DIM, 2, hidden=8), meta)
    args = ["heatmap", "--features", str(d / f"{BAD}.h5"), "--checkpoint", str(ckpt)]
    return _cli(args + ["--out", str(tmp / "hm")], capsys)


READERS = {
    "pretrain": _pretrain,
    "embed-slides": _embed,
    "align": _align,
    "zero-shot/retrieve": _zero_shot_retrieve,
    "mil": _mil,
    "heatmap": _heatmap,
}


@pytest.mark.parametrize("defect", list(DEFECTS))
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_the_same_defect_the_same_way(tmp_path, capsys, reader, defect):
    d, ids = _cohort(tmp_path, defect)
    msg = READERS[reader](d, ids, tmp_path, capsys)
    assert DEFECTS[defect][1] in msg
    assert f"{BAD}.h5" in msg  # names the file


def _byte_offset(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return int(f[name].id.get_offset())


def test_flipped_bytes_in_features_fail_the_checksum(tmp_path, capsys):
    d = tmp_path / "f"
    write_random_bags(d, num=2, dim=DIM, n_range=(20, 30), seed=1)
    p = d / "bag1.h5"
    before = read_features(p).features
    off = _byte_offset(p, "features") + 4 * DIM * 3 + 1  # inside tile 3
    raw = bytearray(p.read_bytes())
    raw[off] ^= 0x10  # one flipped bit: still a finite float, silently wrong before
    p.write_bytes(bytes(raw))
    with h5py.File(p, "r") as f:  # the corruption is a valid number on its own
        x = f["features"][()]
    assert np.isfinite(x).all() and not np.array_equal(x, before)
    with pytest.raises(ValueError, match=r"bag1\.h5.*'features' fails its checksum"):
        read_features(p)
    msg = _zero_shot_retrieve(d, ["bag0", "bag1"], tmp_path, capsys)
    assert "checksum" in msg and "bag1.h5" in msg


def test_checksum_is_crc32_of_the_stored_bytes(tmp_path):
    import zlib

    d = tmp_path / "f"
    write_random_bags(d, num=1, dim=DIM, n_range=(5, 5), seed=2)
    with h5py.File(d / "bag0.h5", "r") as f:
        for name in ("features", "coords", "grid", "tissue_fraction"):
            assert int(f[name].attrs[CHECKSUM_ATTR]) == zlib.crc32(f[name][()].tobytes())


def test_files_without_checksums_still_read(tmp_path):
    """TRIDENT/CLAM-style file: features (1, N, D) + coords, no attrs, no checksum."""
    p = tmp_path / "trident.h5"
    rng = np.random.default_rng(0)
    coords = np.array([[0, 0], [256, 0], [0, 256], [512, 512]], np.int64)
    feats = rng.normal(size=(1, 4, DIM)).astype(np.float32)
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 256
    sf = read_features(p)
    np.testing.assert_array_equal(sf.features, feats[0])
    np.testing.assert_array_equal(sf.grid, coords // 256)


# -- slide-embedding files ------------------------------------------------------------------
def _emb_file(tmp: Path, n: int = 6) -> tuple[Path, list[str]]:
    ids = [f"s{i}" for i in range(n)]
    emb = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    attrs = {"checkpoint_sha256": "random", "seed": 0, "encoder_config": "tiny"}
    return write_embeddings(tmp / "emb.h5", ids, emb, attrs), ids


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])


def _drop_ids(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        del f["slide_ids"]


def _short_ids(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        ids = f["slide_ids"][()][:-2]
        del f["slide_ids"]
        f.create_dataset("slide_ids", data=ids, dtype=h5py.string_dtype("utf-8"))


def _nan_row(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        x = f["embeddings"][()]
        x[3, 1] = np.nan
        f["embeddings"][...] = x
        f["embeddings"].attrs[CHECKSUM_ATTR] = checksum(x)


def _flip(p: Path) -> None:
    with h5py.File(p, "r") as f:
        off = int(f["embeddings"].id.get_offset()) + 4 * 8 * 2 + 2
    raw = bytearray(p.read_bytes())
    raw[off] ^= 0x04
    p.write_bytes(bytes(raw))


EMB_DEFECTS = {
    "truncated": (_truncate, "not a readable HDF5"),
    "no_slide_ids": (_drop_ids, "no slide_ids dataset"),
    "length_mismatch": (_short_ids, "do not match 4 slide ids"),
    "nan_row": (_nan_row, "NaN/Inf embeddings (s3)"),
    "flipped": (_flip, "'embeddings' fails its checksum"),
}


@pytest.mark.parametrize("defect", list(EMB_DEFECTS))
def test_bad_embedding_files_get_one_clear_error(tmp_path, capsys, defect):
    p, ids = _emb_file(tmp_path)
    EMB_DEFECTS[defect][0](p)
    with pytest.raises(ValueError) as e:
        read_embeddings(p)
    assert EMB_DEFECTS[defect][1] in str(e.value) and "emb.h5" in str(e.value)
    # probe reads the file the same way: one line from the CLI, no traceback
    m = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ids, "case_id": ids, "y": [0, 1] * 3}).to_csv(m, index=False)
    args = ["probe", "--embeddings", str(p), "--manifest", str(m), "--label", "y"]
    err = _cli(args + ["--out", str(tmp_path / "pr"), "--no-progress"], capsys)
    assert EMB_DEFECTS[defect][1] in err


def test_mil_predict_refuses_features_of_another_tile_encoder(tmp_path, capsys):
    """The model records its tile encoder; a cohort of another one (same width) is refused."""
    from slidefm.models.mil import build_mil_model, save_mil_checkpoint

    d = tmp_path / "feats"
    ids = write_random_bags(d, num=3, dim=DIM, n_range=(10, 12), seed=4)
    for s in ids:
        _other_encoder(d / f"{s}.h5")
    meta = {"model": "abmil", "in_dim": DIM, "num_classes": 2, "model_kwargs": {"hidden": 8},
            "task": {"labels": ["y"], "classes": ["0", "1"], "multilabel": False},
            "features": {"encoder": "random", "encoder_weights": "random"}}  # fmt: skip
    ckpt = save_mil_checkpoint(tmp_path / "m.pt",
                               build_mil_model("abmil", DIM, 2, hidden=8), meta)  # fmt: skip
    m = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ids, "case_id": ids}).to_csv(m, index=False)
    args = ["mil", "predict", "--checkpoint", str(ckpt), "--manifest", str(m)]
    msg = _cli(args + ["--features", str(d), "--out", str(tmp_path / "p.csv"), "--no-progress"],
               capsys)  # fmt: skip
    assert "tile encoder uni_v2" in msg and "trained on random" in msg
    assert not (tmp_path / "p.csv").exists()
