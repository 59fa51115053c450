"""Probes against scikit-learn and naive loops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slidefm.eval.probes import few_shot, knn_probe, linear_probe, mean_sd, prototype_probe


def data(n: int, c: int = 2, e: int = 12, sep: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    centres = rng.normal(size=(c, e)) * sep
    return rng.normal(size=(n, e)) + centres[y], y


def test_knn_equals_sklearn_cosine_knn():
    x, y = data(150, c=3, seed=1)
    xt, yt = x[:100], y[:100]
    ref = (
        KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute")
        .fit(xt, yt)
        .predict_proba(x[100:])
    )
    np.testing.assert_allclose(knn_probe(xt, yt, x[100:], 3, k=20), ref)
    # k larger than the training set is capped
    p = knn_probe(xt[:5], yt[:5], x[100:], 3, k=20)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p[0], np.bincount(yt[:5], minlength=3) / 5)


def test_linear_probe_picks_best_validation_c_and_refits_on_train_val():
    x, y = data(160, c=2, e=30, sep=0.4, seed=2)
    tr, va, te = slice(0, 60), slice(60, 110), slice(110, 160)
    cs = [1e-3, 1e-1, 10.0]
    res = linear_probe(x[tr], y[tr], x[va], y[va], x[te], 2, cs=cs)
    ref_scores = {}
    for c in cs:
        pipe = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        )
        ref_scores[c] = roc_auc_score(y[va], pipe.fit(x[tr], y[tr]).predict_proba(x[va])[:, 1])
    for c in cs:
        assert res.val_scores[c] == pytest.approx(ref_scores[c])
    best = max(cs, key=lambda c: (ref_scores[c], -c))
    assert res.best_c == best
    pipe = make_pipeline(
        StandardScaler(), LogisticRegression(C=best, max_iter=2000, class_weight="balanced")
    )
    ref = pipe.fit(x[:110], y[:110]).predict_proba(x[te])
    np.testing.assert_allclose(res.proba, ref, atol=1e-6)


def test_linear_probe_class_missing_from_training_gets_a_zero_column():
    x, y = data(60, c=3, seed=3)
    y[:40] = np.where(y[:40] == 2, 0, y[:40])
    res = linear_probe(x[:30], y[:30], x[30:40], y[30:40], x[40:], 3, cs=[1.0])
    assert res.proba.shape == (20, 3) and np.all(res.proba[:, 2] == 0)


def test_prototype_probe_matches_naive_loop():
    x, y = data(40, c=3, seed=4)
    xt, yt, xq = x[:30], y[:30], x[30:]
    p = prototype_probe(xt, yt, xq, 3, temperature=0.1)
    mu = xt.mean(0)
    for i, q in enumerate(xq):
        qn = (q - mu) / np.linalg.norm(q - mu)
        sims = []
        for c in range(3):
            shots = [(s - mu) / np.linalg.norm(s - mu) for s in xt[yt == c]]
            proto = np.mean(shots, 0)
            sims.append(qn @ proto / np.linalg.norm(proto) / 0.1)
        e = np.exp(np.array(sims) - max(sims))
        np.testing.assert_allclose(p[i], e / e.sum(), rtol=1e-9)


def test_few_shot_rows_draws_and_learning_curve():
    x, y = data(300, c=2, e=16, sep=0.6, seed=5)
    df = few_shot(x[:200], y[:200], x[200:], y[200:], 2, shots=(1, 4, 16, 500), n_draws=20, seed=0)
    assert sorted(df["k"].unique()) == [1, 4, 16]  # 500 > smallest class: skipped
    assert (df.groupby("k").size() == 20).all()
    curve = df.groupby("k")["auroc"].mean()
    assert curve[16] > curve[1]
    assert df[df.k == 1]["auroc"].std() > 0  # draws differ


def test_mean_sd_against_numpy():
    df = pd.DataFrame(
        {
            "probe": ["a"] * 3 + ["b"],
            "auroc": [0.5, 0.7, 0.9, 0.6],
            "balanced_accuracy": [0.1, 0.2, 0.3, 0.4],
        }
    )
    out = mean_sd(df, ["probe"], metrics=["auroc", "balanced_accuracy"]).set_index("probe")
    assert out.loc["a", "auroc_mean"] == pytest.approx(0.7)
    assert out.loc["a", "auroc_sd"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert out.loc["b", "auroc_sd"] == 0.0 and out.loc["a", "n"] == 3


def test_few_shot_linear_equals_sklearn_pipeline_on_the_same_shots():
    x, y = data(120, c=3, e=10, sep=0.8, seed=6)
    from slidefm.eval.probes import few_shot_linear

    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    ref = pipe.fit(x[:15], y[:15]).predict_proba(x[15:])
    np.testing.assert_allclose(few_shot_linear(x[:15], y[:15], x[15:], 3), ref, atol=1e-6)
    # a class without shots gets a zero column, the others still sum to one
    keep = y[:30] != 1
    p = few_shot_linear(x[:30][keep], y[:30][keep], x[30:], 3)
    assert np.all(p[:, 1] == 0) and np.allclose(p.sum(1), 1.0)


def test_few_shot_linear_ignores_a_dominant_nuisance_direction_that_breaks_prototypes():
    """The two few-shot classifiers disagree on the case of random ViT features: one shared,
    large, label-free direction. Standardising removes it (same scores as without it); cosine
    prototypes see mostly that direction and fall towards chance."""
    x, y = data(400, c=2, e=8, sep=1.5, seed=7)
    rng = np.random.default_rng(0)
    nuisance = x.copy()
    nuisance[:, 0] = 1000.0 + rng.normal(size=len(x)) * 50.0  # label-free, dominates the norm
    runs = {}
    for name, feats in (("clean", x), ("nuisance", nuisance)):
        for clf in ("prototype", "linear"):
            df = few_shot(feats[:200], y[:200], feats[200:], y[200:], 2, shots=(10,),
                          n_draws=10, seed=0, classifier=clf)  # fmt: skip
            runs[name, clf] = df["balanced_accuracy"].mean()
    assert runs["clean", "linear"] > 0.85 and runs["clean", "prototype"] > 0.85
    assert runs["nuisance", "linear"] > runs["nuisance", "prototype"] + 0.1
    assert runs["nuisance", "linear"] > 0.8
    with pytest.raises(ValueError, match="prototype or linear"):
        few_shot(x, y, x, y, 2, classifier="svm")


def test_same_slide_neighbours_against_sklearn_and_its_chance_level():
    """Against sklearn's brute-force cosine neighbours (self dropped), over more than one
    1024-row block; the chance level is Σ n_s(n_s − 1) / n(n − 1). A slide offset that
    dominates the features drives the fraction to 1; pure noise leaves it near chance."""
    from sklearn.neighbors import NearestNeighbors

    from slidefm.eval.tile_probes import same_slide_neighbours

    rng = np.random.default_rng(8)
    sid = rng.integers(0, 7, 1500).astype(str)
    x = rng.normal(size=(1500, 6)) + rng.normal(size=(7, 6))[sid.astype(int)] * 0.7
    got = same_slide_neighbours(x, sid, k=10)
    nn = NearestNeighbors(n_neighbors=11, metric="cosine", algorithm="brute").fit(x)
    idx = nn.kneighbors(x, return_distance=False)
    ref = np.mean(
        [np.mean(sid[[j for j in row if j != i][:10]] == sid[i]) for i, row in enumerate(idx)]
    )
    assert got["same_slide_knn10"] == pytest.approx(ref, abs=2e-3)  # ties may order apart
    counts = np.bincount(sid.astype(int))
    assert got["same_slide_chance"] == pytest.approx((counts * (counts - 1)).sum() / (1500 * 1499))
    noise = same_slide_neighbours(rng.normal(size=(600, 6)), sid[:600], k=10)
    assert abs(noise["same_slide_knn10"] - noise["same_slide_chance"]) < 0.03
    offset = same_slide_neighbours(x + rng.normal(size=(7, 6))[sid.astype(int)] * 50, sid, k=10)
    assert offset["same_slide_knn10"] > 0.99 > got["same_slide_knn10"] > got["same_slide_chance"]
