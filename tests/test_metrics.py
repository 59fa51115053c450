"""Metrics against independent naive computations (pair counting, per-class loops)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from slidefm.eval.metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    classification_report,
    confusion_matrix_png,
    f1,
    roc_curve_png,
)


def naive_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), by counting every pair."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def naive_f1_class(y, p, k):
    tp = np.sum((y == k) & (p == k))
    fp = np.sum((y != k) & (p == k))
    fn = np.sum((y == k) & (p != k))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auroc_equals_pair_counting(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(size=80) + y, 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(naive_auroc(y, s), abs=1e-12)
    two_col = np.stack([1 - s, s], 1)
    assert auroc(y, two_col) == pytest.approx(naive_auroc(y, s), abs=1e-12)


def test_multiclass_auroc_is_macro_ovr():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 120)
    s = rng.random((120, 4)) + 0.5 * np.eye(4)[y]
    ref = np.mean([naive_auroc((y == k).astype(int), s[:, k]) for k in range(4)])
    assert auroc(y, s) == pytest.approx(ref, abs=1e-12)


def test_multilabel_auroc_is_macro_over_labels():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (60, 3))
    s = rng.random((60, 3)) + 0.3 * y
    ref = np.mean([naive_auroc(y[:, c], s[:, c]) for c in range(3)])
    assert auroc(y, s) == pytest.approx(ref, abs=1e-12)


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc(np.ones(5, int), np.arange(5.0)))


def test_accuracy_balanced_accuracy_f1_against_loops():
    rng = np.random.default_rng(5)
    y = rng.choice(3, 200, p=[0.6, 0.3, 0.1])
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
    assert accuracy(y, p) == pytest.approx(np.mean(y == p))
    recalls = [np.mean(p[y == k] == k) for k in range(3)]
    assert balanced_accuracy(y, p) == pytest.approx(np.mean(recalls))
    per = np.array([naive_f1_class(y, p, k) for k in range(3)])
    assert f1(y, p, "macro") == pytest.approx(per.mean())
    support = np.bincount(y, minlength=3)
    assert f1(y, p, "weighted") == pytest.approx((per * support).sum() / support.sum())
    yb, pb = (y > 0).astype(int), (p > 0).astype(int)
    assert f1(yb, pb, "binary") == pytest.approx(naive_f1_class(yb, pb, 1))
    with pytest.raises(ValueError, match="average"):
        f1(yb, pb, "micro-ish")


def test_bootstrap_ci_of_mean_matches_normal_theory():
    rng = np.random.default_rng(6)
    x = rng.normal(size=400)
    point, lo, hi = bootstrap_ci(lambda t, s: float(np.mean(s)), x, x, n_boot=2000, seed=1)
    se = x.std(ddof=0) / np.sqrt(len(x))
    assert point == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_bootstrap_groups_resamples_whole_patients():
    """Each patient has 10 identical slides: the grouped CI must be as wide as a CI over the
    40 patient values, i.e. ~sqrt(10) wider than the naive row bootstrap."""
    rng = np.random.default_rng(7)
    per_patient = rng.normal(size=40)
    x = np.repeat(per_patient, 10)
    groups = np.repeat(np.arange(40), 10)
    mean = lambda t, s: float(np.mean(s))  # noqa: E731
    _, glo, ghi = bootstrap_ci(mean, x, x, n_boot=2000, seed=2, groups=groups)
    _, rlo, rhi = bootstrap_ci(mean, x, x, n_boot=2000, seed=2)
    se_patients = per_patient.std() / np.sqrt(40)
    assert ghi - glo == pytest.approx(2 * 1.96 * se_patients, rel=0.2)
    assert (ghi - glo) / (rhi - rlo) == pytest.approx(np.sqrt(10), rel=0.25)


def test_bootstrap_degenerate_draws_give_nan_interval():
    y = np.array([0, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.9])
    point, lo, hi = bootstrap_ci(auroc, y, s, n_boot=200)
    # ~68% of draws contain the positive; every such draw is perfectly separated.
    assert (point, lo, hi) == (1.0, 1.0, 1.0)
    point, lo, hi = bootstrap_ci(auroc, np.zeros(6, int), np.arange(6.0), n_boot=50)
    assert np.isnan(point) and np.isnan(lo) and np.isnan(hi)


def test_classification_report_binary_and_multiclass():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 100)
    prob1 = np.clip(0.5 + 0.3 * (2 * y - 1) + 0.3 * rng.normal(size=100), 0, 1)
    prob = np.stack([1 - prob1, prob1], 1)
    rep = classification_report(y, prob, n_boot=200)
    assert set(rep) == {"auroc", "balanced_accuracy", "accuracy", "f1"}
    assert rep["auroc"]["value"] == pytest.approx(naive_auroc(y, prob1))
    for v in rep.values():
        assert v["lo"] <= v["value"] <= v["hi"]
    y3 = rng.integers(0, 3, 90)
    p3 = rng.dirichlet(np.ones(3), 90)
    rep3 = classification_report(y3, p3, n_boot=100)
    assert {"auroc_macro", "f1_macro", "f1_weighted"} <= set(rep3)


def test_pngs_are_written(tmp_path):
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 50)
    s = rng.dirichlet(np.ones(3), 50)
    p1 = roc_curve_png(y, s, tmp_path / "roc.png", class_names=["a", "b", "c"])
    p2 = confusion_matrix_png(y, s.argmax(1), tmp_path / "cm.png", class_names=["a", "b", "c"])
    p3 = roc_curve_png((y > 0).astype(int), s[:, 0], tmp_path / "roc_bin.png")
    for p in (p1, p2, p3):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100


@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_metrics_equal_scikit_learn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(20, 200)), int(rng.integers(3, 6))
    y = rng.integers(0, c, n)
    prob = rng.dirichlet(np.ones(c), n)
    pred = rng.integers(0, c + 1, n)  # may predict a class absent from y_true
    assert auroc(y, prob) == pytest.approx(
        skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")
    )
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from y
        ref_bacc = skm.balanced_accuracy_score(y, pred)
    assert balanced_accuracy(y, pred) == pytest.approx(ref_bacc)
    for avg in ("macro", "weighted"):
        assert f1(y, pred, avg) == pytest.approx(
            skm.f1_score(y, pred, average=avg, zero_division=0)
        )
    yb, sb = (y == 0).astype(int), np.round(prob[:, 0], 2)
    assert auroc(yb, sb) == pytest.approx(skm.roc_auc_score(yb, sb))
    pb = (pred == 0).astype(int)
    assert f1(yb, pb) == pytest.approx(skm.f1_score(yb, pb, zero_division=0))
    yl = rng.integers(0, 2, (n, 3))
    pl = rng.random((n, 3))
    assert auroc(yl, pl) == pytest.approx(skm.roc_auc_score(yl, pl, average="macro"))
    assert accuracy(yl, (pl > 0.5).astype(int)) == pytest.approx(
        skm.accuracy_score(yl, (pl > 0.5).astype(int))
    )


def test_grouped_bootstrap_draws_whole_groups():
    sizes = np.array([1, 2, 3, 5])
    groups = np.repeat(np.array(["a", "b", "c", "d"]), sizes)
    rng = np.random.default_rng(0)
    groups = groups[rng.permutation(len(groups))]  # rows of a group need not be adjacent
    lut = dict(zip("abcd", sizes))

    def whole_groups(t, s):
        names, counts = np.unique(s, return_counts=True)
        return float(all(cnt % lut[g] == 0 for g, cnt in zip(names, counts)))

    _, lo, hi = bootstrap_ci(whole_groups, groups, groups, n_boot=300, groups=groups)
    assert lo == hi == 1.0
