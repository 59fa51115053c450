"""Slide-embedding files: round trip through plain h5py, provenance, refusals."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import slidefm
from slidefm.io.embeddings import read_embeddings, write_embeddings


def test_round_trip_and_plain_h5py(tmp_path):
    emb = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    attrs = {"checkpoint_sha256": "random", "seed": 7, "encoder_config": "tiny", "extra": {"a": 1}}
    p = write_embeddings(tmp_path / "e.h5", ["s1", "s2", "sé"], emb, attrs)
    ids, got, a = read_embeddings(p)
    assert ids == ["s1", "s2", "sé"]
    np.testing.assert_array_equal(got, emb)
    assert a["checkpoint_sha256"] == "random" and a["seed"] == 7 and a["encoder_config"] == "tiny"
    assert a["slidefm_version"] == slidefm.__version__ and a["extra"] == '{"a": 1}'
    with h5py.File(p) as f:  # readable without slidefm
        np.testing.assert_array_equal(f["embeddings"][()], emb)
        assert f["slide_ids"].asstr()[()].tolist() == ids
    assert [x.name for x in tmp_path.iterdir()] == ["e.h5"]  # no temporary left


def test_refusals(tmp_path):
    ok = {"checkpoint_sha256": "x", "seed": 0, "encoder_config": "tiny"}
    with pytest.raises(ValueError, match="shape"):
        write_embeddings(tmp_path / "e.h5", ["a"], np.zeros((2, 3)), ok)
    with pytest.raises(ValueError, match="NaN"):
        write_embeddings(tmp_path / "e.h5", ["a"], np.full((1, 3), np.nan), ok)
    with pytest.raises(ValueError, match="duplicate"):
        write_embeddings(tmp_path / "e.h5", ["a", "a"], np.zeros((2, 3)), ok)
    with pytest.raises(ValueError, match="seed"):
        write_embeddings(
            tmp_path / "e.h5",
            ["a"],
            np.zeros((1, 3)),
            {"checkpoint_sha256": "x", "encoder_config": "t"},
        )
    assert not (tmp_path / "e.h5").exists()
    with pytest.raises(FileNotFoundError):
        read_embeddings(tmp_path / "missing.h5")
