"""Nearest-neighbour retrieval over embeddings and its metrics (Recall@K, MRR, mAP@K).

One interface, three backends — ``build_index(backend, embeddings, ids, payload)`` then
``index.search(queries, k) -> (ids [Q][k], scores [Q, k])`` — all by cosine similarity:

- ``exact``: in-process NumPy (default, and the oracle the others are tested against); ties
  broken by corpus order;
- ``faiss``: ``IndexFlatIP`` on unit vectors (exact, faster on large corpora);
- ``qdrant``: a Qdrant collection with payload metadata (slide_id, case_id, diagnosis…),
  embedded local mode persisted on disk (``QdrantClient(path=...)``) by default, or a server
  (``url=...``) that a team shares.

Metrics take ranked id lists and each query's set of relevant ids:

- Recall@K: fraction of queries with at least one relevant item in the top K (CLIP/TITAN
  retrieval convention, "hit rate");
- MRR: mean of 1 / rank of the first relevant item (0 when none is in the searched depth);
- mAP@K: mean over queries of AP@K = Σ_{i≤K} P@i · rel_i / min(|relevant|, K).
Per-query values are averaged; bootstrap CIs resample queries (whole cases with ``groups``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("exact", "faiss", "qdrant")
TASKS = ("slide2report", "report2slide", "slide2slide")  # of `slidefm retrieve`


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, E], got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Index(Protocol):
    ids: list[str]

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]: ...


class ExactIndex:
    """Brute-force cosine search: scores = q̂ · x̂ᵀ, top-k by descending score (stable)."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str]):
        self.x = l2_normalize(embeddings)
        self.ids = [str(i) for i in ids]

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """queries [Q, E] → (ids [Q][k'], cosine scores [Q, k']), k' = min(k, corpus size)."""
        s = l2_normalize(queries) @ self.x.T
        k = min(int(k), s.shape[1])
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return [[self.ids[j] for j in row] for row in order], np.take_along_axis(s, order, 1)


class FaissIndex:
    """``faiss.IndexFlatIP`` over unit vectors: exact inner-product (= cosine) search."""

    def __init__(self, embeddings: np.ndarray, ids: Sequence[str]):
        try:
            import faiss
        except ImportError as e:
            raise ImportError(
                "the faiss backend needs faiss-cpu (or faiss-gpu): pip install 'slidefm[retrieval]'"
                " or use --backend exact"
            ) from e
        x = l2_normalize(embeddings)
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(np.ascontiguousarray(x))
        self.ids = [str(i) for i in ids]

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        k = min(int(k), len(self.ids))
        scores, idx = self.index.search(np.ascontiguousarray(l2_normalize(queries)), k)
        return [[self.ids[j] for j in row] for row in idx], scores


class QdrantIndex:
    """A Qdrant collection (cosine) holding the vectors and their payload.

    ``path``: embedded local mode persisted in that folder (default); ``url``: a Qdrant server;
    ``client``: an open ``QdrantClient`` (local mode allows one client per folder, so several
    collections in one folder share it).
    Point ids are 0..N-1; the item id is stored in the payload under ``id`` with any extra
    payload (slide_id, case_id, diagnosis, ...).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        payload: Sequence[Mapping[str, Any]] | None = None,
        path: str | Path | None = None,
        url: str | None = None,
        collection: str = "slidefm",
        batch_size: int = 256,
        client: Any = None,
    ):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError as e:
            raise ImportError(
                "the qdrant backend needs qdrant-client: pip install 'slidefm[retrieval]' "
                "or use --backend exact"
            ) from e
        x = l2_normalize(embeddings)
        self.ids = [str(i) for i in ids]
        if payload is not None and len(payload) != len(self.ids):
            raise ValueError(f"{len(payload)} payload rows for {len(self.ids)} ids")
        if client is not None:  # one local-mode client per folder: collections share it
            self.client = client
        elif url:
            self.client = QdrantClient(url=url)
        else:
            if path is None:
                raise ValueError("qdrant backend: give path (local, persisted) or url (server)")
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))
        self.collection = collection
        if self.client.collection_exists(collection):
            self.client.delete_collection(collection)
        self.client.create_collection(
            collection,
            vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.COSINE),
        )
        for s in range(0, len(x), batch_size):
            points = [
                models.PointStruct(
                    id=i,
                    vector=x[i].tolist(),
                    payload={"id": self.ids[i], **(dict(payload[i]) if payload else {})},
                )
                for i in range(s, min(s + batch_size, len(x)))
            ]
            self.client.upsert(collection, points=points, wait=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        from qdrant_client import models

        k = min(int(k), len(self.ids))
        q = l2_normalize(queries)
        reqs = [models.QueryRequest(query=v.tolist(), limit=k, with_payload=False) for v in q]
        out_ids, out_scores = [], np.zeros((len(q), k), dtype=np.float32)
        for r, res in enumerate(self.client.query_batch_points(self.collection, requests=reqs)):
            pts = sorted(res.points, key=lambda p: (-p.score, int(p.id)))  # exact's tie order
            out_ids.append([self.ids[int(p.id)] for p in pts])
            out_scores[r, : len(pts)] = [p.score for p in pts]
        return out_ids, out_scores

    def close(self) -> None:
        self.client.close()


def build_index(
    backend: str,
    embeddings: np.ndarray,
    ids: Sequence[str],
    payload: Sequence[Mapping[str, Any]] | None = None,
    qdrant_path: str | Path | None = None,
    qdrant_url: str | None = None,
    collection: str | None = None,
    qdrant_client: Any = None,
) -> Index:
    """An index of ``embeddings`` [N, E] (rows named by ``ids``) with the chosen backend.

    ``payload`` (one dict per row) is stored by backends that keep metadata (qdrant).
    """
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    if backend == "exact":
        return ExactIndex(embeddings, ids)
    if backend == "faiss":
        return FaissIndex(embeddings, ids)
    if backend == "qdrant":
        return QdrantIndex(
            embeddings,
            ids,
            payload,
            path=qdrant_path,
            url=qdrant_url,
            collection=collection or f"slidefm_{uuid.uuid4().hex[:8]}",
            client=qdrant_client,
        )
    raise ValueError(f"unknown retrieval backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def search_excluding(
    index: Index,
    queries: np.ndarray,
    k: int,
    exclude: Sequence[set[str]] | None = None,
) -> tuple[list[list[str]], np.ndarray]:
    """``index.search`` with, per query, ids that must not be returned (itself, its case).

    Searches k + max(|exclude|) deep, drops the excluded ids and keeps the first k.
    """
    if not exclude:
        return index.search(queries, k)
    extra = max((len(e) for e in exclude), default=0)
    ids, scores = index.search(queries, k + extra)
    out_ids, out_scores = [], np.full((len(ids), k), np.nan, dtype=np.float32)
    for r, (row, sc) in enumerate(zip(ids, scores)):
        keep = [j for j, i in enumerate(row) if i not in exclude[r]][:k]
        out_ids.append([row[j] for j in keep])
        out_scores[r, : len(keep)] = sc[keep]
    return out_ids, out_scores


# -- metrics -------------------------------------------------------------------------------
def per_query_metrics(
    ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, np.ndarray]:
    """Per-query values: ``recall@K`` (hit in top K), ``mrr``, ``map@K`` for each K (see module
    docstring). ranked: ids best-first per query; relevant: the query's relevant ids."""
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} relevance sets")
    q = len(ranked)
    out: dict[str, np.ndarray] = {}
    hits = [np.array([i in rel for i in row], dtype=bool) for row, rel in zip(ranked, relevant)]
    for k in ks:
        out[f"recall@{k}"] = np.array([h[:k].any() for h in hits], dtype=np.float64)
    out["mrr"] = np.array(
        [1.0 / (np.argmax(h) + 1) if h.any() else 0.0 for h in hits], dtype=np.float64
    )
    for k in ks:
        ap = np.zeros(q)
        for r, (h, rel) in enumerate(zip(hits, relevant)):
            hk = h[:k]
            if not rel or not hk.any():
                continue
            prec = np.cumsum(hk) / np.arange(1, len(hk) + 1)
            ap[r] = float((prec * hk).sum() / min(len(rel), k))
        out[f"map@{k}"] = ap
    return out


def chance_levels(
    n_candidates: Sequence[int], n_relevant: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Expected Recall@K and MRR of a random ranking, averaged over queries.

    A query with n candidates of which r are relevant: P(no relevant in the top K) =
    C(n-r, K) / C(n, K) (hypergeometric), so chance Recall@K = 1 - that; the first relevant
    item is at rank i with probability C(n-i, r-1) / C(n, r), so chance MRR = Σ_i P(i) / i.
    """
    from math import comb

    rec = {k: [] for k in ks}
    mrr = []
    for n, r in zip(n_candidates, n_relevant):
        n, r = int(n), int(min(r, n))
        if r <= 0:
            for k in ks:
                rec[k].append(0.0)
            mrr.append(0.0)
            continue
        total = comb(n, r)
        for k in ks:
            rec[k].append(1.0 - comb(n - r, min(k, n)) / comb(n, min(k, n)))
        mrr.append(sum(comb(n - i, r - 1) / total / i for i in range(1, n - r + 2)))
    out = {f"recall@{k}": float(np.mean(v)) if v else float("nan") for k, v in rec.items()}
    out["mrr"] = float(np.mean(mrr)) if mrr else float("nan")
    return out


def retrieval_metrics(
    ranked: Sequence[Sequence[str]],
    relevant: Sequence[set[str]],
    ks: Sequence[int] = (1, 5, 10),
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_candidates: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean of each per-query metric with a 95% bootstrap CI: {name: {value, lo, hi}}.

    With ``n_candidates`` (items each query ranks): Recall@K and MRR also carry ``chance``
    (``chance_levels``), and metrics @K with K ≥ the fewest candidates are left out (every
    relevant item is then in the top K by construction); ``omitted`` lists them.
    """
    from slidefm.eval.metrics import bootstrap_ci  # scipy/sklearn: not at import (CLI start-up)

    if len(ranked) == 0:
        raise ValueError("no queries to score")
    per = per_query_metrics(ranked, relevant, ks)
    chance: dict[str, float] = {}
    omitted: list[str] = []
    if n_candidates is not None:
        chance = chance_levels(n_candidates, [len(r) for r in relevant], ks)
        fewest = int(min(n_candidates))
        omitted = [n for n in per if "@" in n and int(n.split("@")[1]) >= fewest]
        per = {n: v for n, v in per.items() if n not in omitted}
    g = None if groups is None else np.asarray(groups)
    out: dict[str, Any] = {}
    for i, (name, vals) in enumerate(per.items()):
        v, lo, hi = bootstrap_ci(
            lambda _t, x: float(np.mean(x)),
            np.zeros(len(vals)),
            vals,
            n_boot=n_boot,
            seed=seed + i,
            groups=g,
        )
        out[name] = {"value": v, "lo": lo, "hi": hi}
        if name in chance:
            out[name]["chance"] = chance[name]
    out["num_queries"] = {"value": float(len(ranked)), "lo": float("nan"), "hi": float("nan")}
    if n_candidates is not None:
        out["num_candidates_min"] = {"value": float(min(n_candidates)), "lo": float("nan"),
                                     "hi": float("nan")}  # fmt: skip
    if omitted:
        out["omitted"] = {  # same keys as a metric, so readers can iterate uniformly
            "value": float(len(omitted)),
            "lo": float("nan"),
            "hi": float("nan"),
            "metrics": omitted,
            "reason": f"K >= {int(min(n_candidates))} candidates: trivially 1",
        }
    return out
