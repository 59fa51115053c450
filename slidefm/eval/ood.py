"""Is a slide like the slides a model was aligned on? A calibrated out-of-domain test.

A zero-shot model always returns a probability for one of its prompt classes, even for a
slide from another organ (a head-and-neck slide scored "lung adenocarcinoma 0.95"). The
softmax cannot say "none of these"; the embedding space can:

- score: s(x) = mean cosine similarity of the slide's aligned embedding to its k nearest
  *training* slides (deep-kNN out-of-distribution score, Sun et al. 2022);
- calibration: the same score for slides the reference does not contain (the validation
  patients; without them, each training slide against the others, leave-one-out);
- test: conformal p-value p(x) = (1 + #{calibration scores ≤ s(x)}) / (n_cal + 1). For an
  in-domain slide (exchangeable with the calibration slides) P(p ≤ α) ≤ α, so flagging
  p ≤ α (0.05) wrongly flags at most ~5% of in-domain slides, whatever the embedding model.

The reference is stored in the alignment checkpoint (``extra["domain_reference"]``), so
``slidefm zero-shot`` can warn on any input, with or without a manifest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

DEFAULT_ALPHA = 0.05


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_similarity(
    queries: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False
) -> np.ndarray:
    """[Q] mean cosine similarity of each query [Q, E] to its k most similar rows of
    ``reference`` [R, E]; ``exclude_self``: queries are the reference rows, skip row i."""
    q, r = _unit(queries), _unit(reference)
    sim = q @ r.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, r.shape[0] - int(exclude_self)))
    top = -np.sort(-sim, axis=1)[:, :k]
    return top.mean(axis=1).astype(np.float64)


def conformal_pvalues(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """p = (1 + #{c ≤ s}) / (n + 1) per score: small when s is lower than almost every
    calibration score (low similarity = unlike the reference)."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    below = np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="right")
    return (1.0 + below) / (len(cal) + 1.0)


@dataclasses.dataclass
class DomainReference:
    """Aligned embeddings of (up to ``max_reference``) training slides and the calibration
    scores of held-out slides; ``to_dict`` is what a checkpoint stores."""

    embeddings: np.ndarray  # [R, E] unit vectors, float32
    calibration: np.ndarray  # [n_cal] kNN similarities of slides outside the reference
    k: int
    calibrated_on: str  # "validation slides" | "training slides, leave-one-out"

    @classmethod
    def build(
        cls,
        train: np.ndarray,
        held_out: np.ndarray | None = None,
        k: int = 5,
        max_reference: int = 2048,
        min_calibration: int = 10,
        seed: int = 0,
    ) -> DomainReference:
        """From aligned embeddings of training slides [N, E] and, when there are at least
        ``min_calibration`` of them, held-out (validation) slides [M, E]."""
        train = _unit(train)
        if len(train) < 2:
            raise ValueError("a domain reference needs at least 2 training slides")
        if len(train) > max_reference:
            keep = np.random.default_rng(seed).choice(len(train), max_reference, replace=False)
            train = train[np.sort(keep)]
        if held_out is not None and len(held_out) >= min_calibration:
            cal = knn_similarity(held_out, train, k)
            how = "validation slides"
        else:
            cal = knn_similarity(train, train, k, exclude_self=True)
            how = "training slides, leave-one-out"
        return cls(train.astype(np.float32), cal, k, how)

    def test(
        self, z: np.ndarray, alpha: float = DEFAULT_ALPHA
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(similarity [Q], p-value [Q], out_of_domain [Q] bool = p ≤ alpha) of embeddings z."""
        s = knn_similarity(z, self.embeddings, self.k)
        p = conformal_pvalues(s, self.calibration)
        return s, p, p <= alpha

    def to_dict(self) -> dict[str, Any]:
        import torch

        return {
            "embeddings": torch.from_numpy(self.embeddings.astype(np.float16)),
            "calibration": [float(c) for c in self.calibration],
            "k": int(self.k),
            "calibrated_on": self.calibrated_on,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainReference:
        emb = d["embeddings"]
        emb = emb.float().numpy() if hasattr(emb, "numpy") else np.asarray(emb, np.float32)
        return cls(_unit(emb), np.asarray(d["calibration"], np.float64), int(d["k"]),
                   str(d["calibrated_on"]))  # fmt: skip
