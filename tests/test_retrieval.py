"""Retrieval backends agree with brute force; metrics match hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from slidefm.eval.retrieval import (
    build_index,
    per_query_metrics,
    retrieval_metrics,
    search_excluding,
)


def brute_force(corpus, queries, k):
    """Reference: cosine by explicit loops over rows, then numpy argsort of the negated scores."""
    out = []
    for q in queries:
        s = np.array([q @ x / (np.linalg.norm(q) * np.linalg.norm(x)) for x in corpus])
        out.append(np.argsort(-s, kind="stable")[:k])
    return np.array(out)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(200, 24)).astype(np.float32)
    queries = rng.normal(size=(15, 24)).astype(np.float32)
    return corpus, queries, [f"slide_{i:03d}" for i in range(200)]


def test_exact_equals_brute_force(data):
    corpus, queries, ids = data
    got_ids, scores = build_index("exact", corpus, ids).search(queries, 10)
    ref = brute_force(corpus.astype(np.float64), queries.astype(np.float64), 10)
    assert got_ids == [[ids[j] for j in row] for row in ref]
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # best first


def test_exact_breaks_ties_by_corpus_order():
    corpus = np.array([[1.0, 0], [0, 1], [1.0, 0], [2.0, 0]])
    got, _ = build_index("exact", corpus, ["a", "b", "c", "d"]).search(np.array([[1.0, 0]]), 4)
    assert got == [["a", "c", "d", "b"]]


@pytest.mark.parametrize("backend", ["faiss", "qdrant"])
def test_backends_return_exact_neighbours(backend, data, tmp_path):
    corpus, queries, ids = data
    payload = [{"slide_id": i, "case_id": f"case_{j // 2}", "diagnosis": "x"} for j, i in
               enumerate(ids)]  # fmt: skip
    ref_ids, ref_scores = build_index("exact", corpus, ids).search(queries, 10)
    idx = build_index(backend, corpus, ids, payload=payload, qdrant_path=tmp_path / "qdrant")
    got_ids, got_scores = idx.search(queries, 10)
    assert got_ids == ref_ids
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)
    if backend == "qdrant":  # payload stored with the vectors, persisted on disk
        pts = idx.client.retrieve(idx.collection, ids=[5], with_payload=True)
        assert pts[0].payload == {"id": ids[5], **payload[5]}
        idx.close()
        assert any((tmp_path / "qdrant").rglob("*"))


def test_unknown_backend_lists_the_choices(data):
    with pytest.raises(ValueError, match="exact, faiss, qdrant"):
        build_index("annoy", data[0], data[2])


def test_search_excluding_drops_self_and_same_case(data):
    corpus, _, ids = data
    q = corpus[:3]
    excl = [{ids[0], ids[1]}, {ids[1]}, set()]
    got, _ = search_excluding(build_index("exact", corpus, ids), q, 5, excl)
    full, _ = build_index("exact", corpus, ids).search(q, 8)
    for r in range(3):
        assert got[r] == [i for i in full[r] if i not in excl[r]][:5]
        assert not excl[r] & set(got[r])


def test_metrics_hand_computed():
    ranked = [
        ["a", "b", "c", "d"],  # first relevant at rank 2
        ["x", "y", "z", "w"],  # relevant at ranks 1 and 3, |rel| = 2
        ["p", "q", "r", "s"],  # relevant never retrieved
    ]
    relevant = [{"b"}, {"x", "z"}, {"t"}]
    m = per_query_metrics(ranked, relevant, ks=(1, 3))
    np.testing.assert_allclose(m["recall@1"], [0, 1, 0])
    np.testing.assert_allclose(m["recall@3"], [1, 1, 0])
    np.testing.assert_allclose(m["mrr"], [1 / 2, 1, 0])
    np.testing.assert_allclose(m["map@1"], [0, 1, 0])
    # AP@3: q1 = (1/2)/1; q2 = (1/1 + 2/3)/2
    np.testing.assert_allclose(m["map@3"], [0.5, (1 + 2 / 3) / 2, 0])
    agg = retrieval_metrics(ranked, relevant, ks=(1, 3), n_boot=200)
    assert agg["mrr"]["value"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert agg["recall@3"]["lo"] <= agg["recall@3"]["value"] <= agg["recall@3"]["hi"]
    assert agg["num_queries"]["value"] == 3


def test_chance_levels_match_random_rankings():
    """Analytic chance Recall@K / MRR against the mean over many random permutations."""
    from slidefm.eval.retrieval import chance_levels, per_query_metrics

    rng = np.random.default_rng(0)
    n_cand, n_rel = [8, 12, 30], [1, 3, 2]
    ks = (1, 5, 10)
    sims = {f"recall@{k}": [] for k in ks} | {"mrr": []}
    for n, r in zip(n_cand, n_rel):
        items = [str(i) for i in range(n)]
        rel = {str(i) for i in range(r)}
        per = per_query_metrics([list(rng.permutation(items)) for _ in range(20000)],
                                [rel] * 20000, ks)  # fmt: skip
        for name in sims:
            sims[name].append(per[name].mean())
    got = chance_levels(n_cand, n_rel, ks)
    for name, vals in sims.items():
        assert got[name] == pytest.approx(np.mean(vals), abs=0.01), name
    assert got["recall@10"] < 1  # 8 candidates: K=10 is trivially 1 for that query only


def test_retrieval_metrics_omit_k_at_or_above_the_candidates():
    from slidefm.eval.retrieval import retrieval_metrics

    ranked = [["a", "b", "c", "d", "e"], ["b", "a", "c", "d", "e"]]
    m = retrieval_metrics(ranked, [{"a"}, {"a"}], ks=(1, 5), n_boot=20, n_candidates=[5, 5])
    assert "recall@5" not in m and "map@5" not in m and "recall@1" in m
    assert m["omitted"]["metrics"] == ["recall@5", "map@5"]
    assert m["recall@1"]["chance"] == pytest.approx(1 / 5)
    assert m["mrr"]["chance"] == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    with pytest.raises(ValueError, match="no queries"):
        retrieval_metrics([], [], n_boot=10)
