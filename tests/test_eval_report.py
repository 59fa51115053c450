"""Targets from manifests, patient aggregation, and the CV report against naive computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from slidefm.eval.report import evaluate_predictions, write_report
from slidefm.eval.targets import (
    Task,
    aggregate_patients,
    check_feature_files,
    encode_targets,
    make_task,
    target_frame,
)
from slidefm.io.manifest import ManifestError


def naive_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_make_task_orders_classes_and_rejects_bad_labels():
    df = pd.DataFrame(
        {
            "slide_id": list("abcd"),
            "m": [1, 0, 1, 0],
            "t": ["True", "False", "True", "True"],
            "s": ["lusc", "luad", "meso", "luad"],
        }
    )
    assert make_task(df, ["m"]).classes == ("0", "1")
    assert make_task(df, ["t"]).classes == ("False", "True")
    assert make_task(df, ["s"]).classes == ("luad", "lusc", "meso")
    assert list(encode_targets(df, make_task(df, ["s"]))) == [1, 0, 2, 0]
    with pytest.raises(ManifestError, match="unknown value"):
        make_task(df, ["s"], classes=["luad", "lusc"])
    with pytest.raises(ManifestError, match="no label column"):
        make_task(df, ["msi"])
    with pytest.raises(ManifestError, match="single value"):
        make_task(df.assign(k=1), ["k"])
    with pytest.raises(ManifestError, match="empty"):
        make_task(df.assign(m=[1, None, 0, 1]), ["m"])
    ml = make_task(df.assign(a=[1, 0, 0, 1]), ["m", "a"])
    assert ml.multilabel and ml.classes == ("m", "a")
    np.testing.assert_array_equal(
        encode_targets(df.assign(a=[1, 0, 0, 1]), ml), [[1, 1], [0, 0], [1, 0], [0, 1]]
    )
    with pytest.raises(ManifestError, match="unknown value"):
        make_task(df.assign(a=[2, 0, 0, 1]), ["m", "a"])
    assert Task.from_dict(ml.to_dict()) == ml


def test_check_feature_files_names_missing_slides(tmp_path):
    df = pd.DataFrame({"slide_id": ["s1", "s2", "s3"]})
    (tmp_path / "s1.h5").write_bytes(b"x")
    with pytest.raises(ManifestError, match="s2, s3"):
        check_feature_files(df, tmp_path)
    with pytest.raises(FileNotFoundError, match="encode-slides"):
        check_feature_files(df, tmp_path / "nope")


def test_aggregate_patients_means_probabilities():
    task = Task(("m",), ("0", "1"), False)
    preds = pd.DataFrame(
        {
            "seed": 0,
            "fold": [0, 0, 0, 1],
            "slide_id": ["a1", "a2", "b1", "c1"],
            "case_id": ["A", "A", "B", "C"],
            "y": [1, 1, 0, 0],
            "prob_0": [0.2, 0.6, 0.9, 0.5],
            "prob_1": [0.8, 0.4, 0.1, 0.5],
        }
    )
    out = aggregate_patients(preds, task).set_index("case_id")
    assert out.loc["A", "prob_1"] == pytest.approx(0.6) and out.loc["A", "n_slides"] == 2
    assert out.loc["B", "y"] == 0 and len(out) == 3
    preds.loc[1, "y"] = 0
    with pytest.raises(ManifestError, match="A"):
        aggregate_patients(preds, task)


def fake_cv(seed: int = 0, n_patients: int = 50):
    rng = np.random.default_rng(seed)
    rows = []
    for s in (0, 1):
        for p in range(n_patients):
            y = p % 2
            for k in range(1 + p % 2):
                p1 = float(np.clip(0.5 + 0.25 * (2 * y - 1) + 0.3 * rng.normal(), 0, 1))
                rows.append(
                    {
                        "seed": s,
                        "fold": p % 3,
                        "slide_id": f"P{p}_{k}",
                        "case_id": f"P{p}",
                        "y": y,
                        "prob_0": 1 - p1,
                        "prob_1": p1,
                    }
                )
    return pd.DataFrame(rows)


def test_evaluate_predictions_matches_naive_metrics(tmp_path):
    task = Task(("m",), ("0", "1"), False)
    preds = fake_cv()
    res = evaluate_predictions(preds, task, n_boot=200)
    assert len(res["per_fold"]) == 6 and len(res["per_seed"]) == 2
    seed_auc = []
    for row in res["per_seed"]:
        part = preds[preds.seed == row["seed"]]
        ref = naive_auroc(part["y"].to_numpy(), part["prob_1"].to_numpy())
        assert row["auroc"] == pytest.approx(ref)
        seed_auc.append(ref)
        recall = [
            np.mean((part["prob_1"] > 0.5)[part.y == 1]),
            np.mean((part["prob_1"] <= 0.5)[part.y == 0]),
        ]
        assert row["balanced_accuracy"] == pytest.approx(np.mean(recall))
    for row in res["per_fold"]:
        part = preds[(preds.seed == row["seed"]) & (preds.fold == row["fold"])]
        assert row["auroc"] == pytest.approx(
            naive_auroc(part["y"].to_numpy(), part["prob_1"].to_numpy())
        )
        assert row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
    summ = res["summary"]["auroc"]
    assert summ["value"] == pytest.approx(np.mean(seed_auc))
    assert summ["lo"] < summ["value"] < summ["hi"] and summ["hi"] - summ["lo"] < 0.4
    assert summ["sd_over_seeds"] == pytest.approx(np.std(seed_auc, ddof=1))
    paths = write_report(tmp_path, preds, task, res, {"model": "x", "seed": 0})
    assert json.loads(paths["results"].read_text())["model"] == "x"
    assert paths["roc_seed0"].is_file() and len(pd.read_csv(paths["fold_metrics"])) == 6


def test_evaluate_multilabel_and_target_frame():
    rng = np.random.default_rng(1)
    task = Task(("a", "b"), ("a", "b"), True)
    y = rng.integers(0, 2, (40, 2))
    p = np.clip(0.3 * y + 0.7 * rng.random((40, 2)), 0, 1)
    df = pd.concat([target_frame(y, task), pd.DataFrame(p, columns=task.prob_columns)], axis=1)
    df["seed"], df["fold"], df["case_id"] = 0, np.arange(40) % 2, [f"c{i}" for i in range(40)]
    res = evaluate_predictions(df, task, n_boot=50)
    ref = np.mean([naive_auroc(y[:, c], p[:, c]) for c in range(2)])
    assert res["per_seed"][0]["auroc_macro"] == pytest.approx(ref)
