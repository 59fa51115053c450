"""Manifests of ``mil train`` / ``probe`` (issue 17): patients are required (or an explicit
``--slide-level-only`` that says what it risks); one-slide classes and rare classes are said in
our words; label whitespace never makes an extra class (it is stripped, with a warning)."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from bag_utils import write_random_bags

from slidefm.cli import main
from slidefm.eval.splits import make_cv_splits
from slidefm.eval.targets import check_class_sizes, make_task
from slidefm.io.embeddings import write_embeddings
from slidefm.io.manifest import ManifestError, strip_labels

pytestmark = pytest.mark.usefixtures("one_thread")

N = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    ids = write_random_bags(d / "feats", num=N, dim=8, n_range=(10, 20), side=6, seed=0)
    emb = np.random.default_rng(0).normal(size=(N, 8)).astype(np.float32)
    attrs = {"checkpoint_sha256": "random", "seed": 0, "encoder_config": "tiny"}
    write_embeddings(d / "emb.h5", ids, emb, attrs)
    return d, ids


def _manifest(d, ids, labels, case_id=True, name="m.csv"):
    df = pd.DataFrame({"slide_id": ids, "y": labels})
    if case_id:
        df.insert(1, "case_id", [f"p{i}" for i in range(len(ids))])
    df.to_csv(d / name, index=False)
    return d / name


def _mil(d, m, out, *extra):
    args = ["mil", "train", "--manifest", str(m), "--features", str(d / "feats"), "--label", "y"]
    args += ["--folds", "2", "--epochs", "1", "--out", str(out), "--no-progress", *extra]
    return main(args + ["--set", "n_boot=10"])


def _probe(d, m, out, *extra):
    args = ["probe", "--embeddings", str(d / "emb.h5"), "--manifest", str(m), "--label", "y"]
    args += ["--folds", "2", "--seeds", "0", "--probes", "linear,knn", "--k", "3"]
    return main(args + ["--n-boot", "10", "--out", str(out), "--no-progress", *extra])


LABELS = ["Pos", "Neg"] * (N // 2)


@pytest.mark.parametrize("cmd", [_mil, _probe])
def test_case_id_is_required_unless_slide_level_only(data, tmp_path, capsys, cmd):
    d, ids = data
    m = _manifest(tmp_path, ids, LABELS, case_id=False)
    assert cmd(d, m, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "no case_id column" in err and "--slide-level-only" in err
    assert "different folds" in err  # says what is at stake
    assert cmd(d, m, tmp_path / "b", "--slide-level-only") == 0
    out = capsys.readouterr().out
    assert "NOTE: --slide-level-only" in out and "inflates the metrics" in out


def test_slide_level_only_is_recorded_in_mil_results(data, tmp_path):
    d, ids = data
    m = _manifest(tmp_path, ids, LABELS, case_id=False)
    assert _mil(d, m, tmp_path / "r", "--slide-level-only") == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert any("slide-level-only" in n for n in res["notes"])


@pytest.mark.parametrize("cmd", [_mil, _probe])
def test_one_slide_class_is_our_error(data, tmp_path, capsys, cmd):
    d, ids = data
    labels = list(LABELS)
    labels[7] = "Pso"  # a typo: a class of one slide
    m = _manifest(tmp_path, ids, labels)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cmd(d, m, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "'Pso' (slide bag7)" in err and "single slide" in err and "typo" in err
    assert not [x for x in w if "least populated" in str(x.message)]


def test_rare_class_warning_is_ours_not_sklearns(caplog):
    n = 20
    df = pd.DataFrame({"slide_id": [f"s{i}" for i in range(n)], "case_id": [f"p{i}" for i in range(n)],
                       "y": ["a"] * 17 + ["b"] * 3})  # fmt: skip
    with warnings.catch_warnings(record=True) as w, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        splits = make_cv_splits(df, "y", n_folds=5)
    assert not [x for x in w if "least populated" in str(x.message)]
    assert any("'b' (3)" in r.getMessage() and "fewer patients than folds" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # the split itself is unchanged: every slide in exactly one test fold
    assert splits[splits.split == "test"].slide_id.value_counts().eq(1).all()


def test_label_whitespace_is_stripped_not_a_class(data, tmp_path, caplog):
    d, ids = data
    labels = list(LABELS)
    labels[0], labels[2] = "Pos ", " Pos"
    df = pd.DataFrame({"slide_id": ids, "y": labels})
    with caplog.at_level(logging.WARNING):
        clean = strip_labels(df, ["y"])
    assert make_task(clean, ["y"]).classes == ("Neg", "Pos")
    assert any("stripped whitespace from 2 value(s)" in r.getMessage() for r in caplog.records)
    assert df["y"][0] == "Pos "  # the caller's frame is not changed
    with pytest.raises(ManifestError, match="single slide"):  # unstripped: 'Pos ' was a class
        check_class_sizes(df, make_task(df, ["y"]))
    m = _manifest(tmp_path, ids, labels)
    assert _mil(d, m, tmp_path / "w") == 0
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["task"]["classes"] == ["Neg", "Pos"]
