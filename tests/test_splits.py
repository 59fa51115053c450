"""Cross-validation splits: patients never cross splits, each slide is tested exactly once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidefm.eval.splits import (
    check_splits,
    load_or_make_splits,
    load_splits,
    make_cv_splits,
    save_splits,
    splits_from_manifest,
)


def cohort(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """1–3 slides per patient; the label is a patient property, 30% positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        lab = int(rng.random() < 0.3)
        for s in range(rng.integers(1, 4)):
            rows.append({"slide_id": f"P{p}_S{s}", "case_id": f"P{p}", "label": lab})
    return pd.DataFrame(rows)


def test_folds_group_patients_and_cover_every_slide_once():
    df = cohort()
    splits = make_cv_splits(df, "label", n_folds=5, seeds=[0, 1, 2])
    assert sorted(splits["seed"].unique()) == [0, 1, 2]
    for _seed, per_seed in splits.groupby("seed"):
        tests = per_seed[per_seed["split"] == "test"]
        # every slide in exactly one test fold
        assert sorted(tests["slide_id"]) == sorted(df["slide_id"])
        for _fold, part in per_seed.groupby("fold"):
            assert len(part) == len(df)
            sets = {
                name: set(part.loc[part["split"] == name, "case_id"])
                for name in ("train", "val", "test")
            }
            assert not sets["train"] & sets["val"]
            assert not sets["train"] & sets["test"]
            assert not sets["val"] & sets["test"]
            assert len(sets["val"]) > 0 and len(sets["train"]) > len(sets["val"])
            # label balance roughly kept in the test fold
            pos_rate = df["label"].mean()
            test_rate = (
                df.set_index("slide_id")
                .loc[part.loc[part["split"] == "test", "slide_id"], "label"]
                .mean()
            )
            assert abs(test_rate - pos_rate) < 0.15
    # different seeds give different partitions
    a = splits[(splits.seed == 0) & (splits.split == "test") & (splits.fold == 0)]["slide_id"]
    b = splits[(splits.seed == 1) & (splits.split == "test") & (splits.fold == 0)]["slide_id"]
    assert set(a) != set(b)


def test_splits_are_deterministic_and_round_trip(tmp_path):
    df = cohort(seed=1)
    s1 = make_cv_splits(df, "label", n_folds=4, seeds=[3])
    s2 = make_cv_splits(df, "label", n_folds=4, seeds=[3])
    pd.testing.assert_frame_equal(s1, s2)
    save_splits(s1, tmp_path / "splits.csv")
    back = load_splits(tmp_path / "splits.csv", df["slide_id"])
    pd.testing.assert_frame_equal(s1.astype({"stratum": str}), back, check_dtype=False)


def test_load_or_make_reuses_and_refuses_mismatch(tmp_path):
    df = cohort(seed=2)
    p = tmp_path / "splits.csv"
    s1 = load_or_make_splits(p, df, "label", 3, [0, 1])
    mtime = p.stat().st_mtime_ns
    s2 = load_or_make_splits(p, df, "label", 3, [1])
    assert p.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(s1[s1.seed == 1].reset_index(drop=True), s2, check_dtype=False)
    with pytest.raises(ValueError, match="delete it"):
        load_or_make_splits(p, df, "label", 5, [0])
    with pytest.raises(ValueError, match="does not match the manifest"):
        load_or_make_splits(p, df.iloc[:-2], "label", 3, [0])


def test_check_splits_catches_patient_in_two_splits():
    df = cohort(n_patients=20)
    splits = make_cv_splits(df, "label", n_folds=4, seeds=[0])
    bad = splits.copy()
    multi = df.groupby("case_id").size()
    case = multi[multi > 1].index[0]
    rows = bad.index[(bad.fold == 0) & (bad.case_id == case)]
    bad.loc[rows[0], "split"] = "train" if bad.loc[rows[1], "split"] != "train" else "test"
    with pytest.raises(ValueError, match="more than one split"):
        check_splits(bad)


def test_too_many_folds_is_a_clear_error():
    df = cohort(n_patients=4)
    with pytest.raises(ValueError, match="number of patients"):
        make_cv_splits(df, "label", n_folds=5)


def test_splits_from_manifest_column():
    df = cohort(n_patients=10)
    df["split"] = np.where(
        df["case_id"].isin(["P0", "P1"]), "test", np.where(df["case_id"] == "P2", "val", "train")
    )
    s = splits_from_manifest(df, "label", seeds=[0, 1])
    assert len(s) == 2 * len(df) and set(s["fold"]) == {0}
    df.loc[0, "split"] = "holdout"
    with pytest.raises(ValueError, match="holdout"):
        splits_from_manifest(df, "label")
