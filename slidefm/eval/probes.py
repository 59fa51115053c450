"""Probes on frozen slide embeddings: logistic regression (C chosen on validation), kNN (k=20,
cosine), few-shot prototypes. They measure what an embedding already separates, without
training a MIL model (Roth et al.; eva).

Shapes: embeddings ``x`` (N, E) float; labels ``y`` (N,) int in [0, C). Every probe returns
test-set class probabilities (N_test, C), so one metric code path scores them all.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from slidefm.eval.metrics import accuracy, auroc, balanced_accuracy, f1

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
FEW_SHOT_KS = (1, 2, 4, 8, 16)


def l2_rows(x: np.ndarray) -> np.ndarray:
    """(n, D) → each row at unit L2 norm (all-zero rows stay zero): cosine similarity as a dot."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _full_proba(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba with a column for every class, also those absent from training."""
    out = np.zeros((len(x), num_classes))
    out[:, clf.classes_.astype(int)] = clf.predict_proba(x)
    return out


@dataclasses.dataclass
class LinearProbeResult:
    """Test probabilities (N_test, C), the chosen C and the validation AUROC for every C."""

    proba: np.ndarray
    best_c: float
    val_scores: dict[float, float]


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    num_classes: int,
    cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 2000,
) -> LinearProbeResult:
    """Standardised features → L2-regularised, class-balanced logistic regression.

    Each C in ``cs`` is fit on train and scored by validation AUROC (macro for multi-class);
    ties go to the smaller C (stronger regularisation). The chosen model is refit on train +
    val before predicting test, so the test set is never used to choose anything.
    """
    scaler = StandardScaler().fit(x_train)

    def fit(x, y, c):
        clf = LogisticRegression(C=c, max_iter=max_iter, class_weight="balanced", random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x, y)

    scores: dict[float, float] = {}
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    for c in sorted(cs):
        a = auroc(y_val, _full_proba(fit(xt, y_train, c), xv, num_classes), num_classes=num_classes)
        scores[c] = a if np.isfinite(a) else -np.inf
    best = max(sorted(scores), key=lambda c: scores[c])  # max keeps the first (smallest C) on ties
    x_all, y_all = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    scaler = StandardScaler().fit(x_all)
    clf = fit(scaler.transform(x_all), y_all, best)
    return LinearProbeResult(_full_proba(clf, scaler.transform(x_test), num_classes), best, scores)


def knn_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int, k: int = 20
) -> np.ndarray:
    """k nearest neighbours by cosine similarity, uniform votes → (N_test, C) vote fractions.

    ``k`` is capped at the training-set size. Ties in similarity keep the lower training index.
    """
    k = min(k, len(x_train))
    sim = l2_rows(x_test) @ l2_rows(x_train).T  # (N_test, N_train)
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(x_test), num_classes))
    for c in range(num_classes):
        votes[:, c] = (y_train[nn_idx] == c).sum(1)
    return votes / k


def prototype_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    num_classes: int,
    temperature: float = 0.1,
) -> np.ndarray:
    """SimpleShot: centre on the training mean, L2-normalise, cosine to each class prototype
    (mean of its normalised shots), softmax(sim / temperature) → (N_test, C).

    Classes without shots get probability 0. Few-shot uses this because it has no
    hyper-parameter to tune on a validation set that few-shot settings do not have.
    """
    mu = x_train.mean(0, keepdims=True)
    tr, te = l2_rows(x_train - mu), l2_rows(x_test - mu)
    logits = np.full((len(x_test), num_classes), -np.inf)
    for c in np.unique(y_train).astype(int):
        proto = l2_rows(tr[y_train == c].mean(0, keepdims=True))
        logits[:, c] = (te @ proto.T)[:, 0] / temperature
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


FEW_SHOT_C = 1.0  # few-shot has no validation split to choose C on: sklearn's default


def few_shot_linear(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    num_classes: int,
    seed: int = 0,
    c: float = FEW_SHOT_C,
    max_iter: int = 2000,
) -> np.ndarray:
    """Standardise on the shots, L2 logistic regression at a fixed ``c`` (no tuning: k shots
    per class leave nothing to validate on) → (N_test, C) probabilities; classes without
    shots get 0."""
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y_train)
    return _full_proba(clf, scaler.transform(x_test), num_classes)


def score(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Headline metrics of (N, C) probabilities: AUROC, balanced accuracy, accuracy, F1."""
    c = proba.shape[1]
    pred = proba.argmax(1)
    return {
        "auroc": auroc(y_true, proba, num_classes=c),
        "balanced_accuracy": balanced_accuracy(y_true, pred),
        "accuracy": accuracy(y_true, pred),
        "f1": f1(y_true, pred, "binary" if c == 2 else "macro"),
    }


def few_shot(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    shots: Sequence[int] = FEW_SHOT_KS,
    n_draws: int = 50,
    seed: int = 0,
    classifier: str = "prototype",
) -> pd.DataFrame:
    """For each k in ``shots``, ``n_draws`` random draws of k training slides per class, scored
    on the whole test set. Returns one row per (k, draw) with the metrics of ``score``. A k
    larger than the smallest class is skipped (not silently shrunk).

    ``classifier``: ``prototype`` (``prototype_probe``, cosine to class means of the raw
    features) or ``linear`` (``few_shot_linear``: standardised logistic regression). They can
    disagree: cosine prototypes suffer from a dominant shared direction (random ViT features)
    that standardising removes, so a gain under one may vanish under the other.
    """
    if classifier not in ("prototype", "linear"):
        raise ValueError(f"few-shot classifier must be prototype or linear, not {classifier!r}")
    rng = np.random.default_rng(seed)
    per_class = {c: np.flatnonzero(y_train == c) for c in range(num_classes)}
    smallest = min(len(v) for v in per_class.values())
    rows = []
    for k in shots:
        if k > smallest:
            continue
        for draw in range(n_draws):
            idx = np.concatenate(
                [rng.choice(per_class[c], size=k, replace=False) for c in range(num_classes)]
            )
            if classifier == "linear":
                proba = few_shot_linear(x_train[idx], y_train[idx], x_test, num_classes, seed)
            else:
                proba = prototype_probe(x_train[idx], y_train[idx], x_test, num_classes)
            rows.append({"k": k, "draw": draw, **score(y_test, proba)})
    return pd.DataFrame(rows, columns=["k", "draw", "auroc", "balanced_accuracy", "accuracy", "f1"])


def mean_sd(
    df: pd.DataFrame,
    by: Sequence[str],
    metrics: Sequence[str] = ("auroc", "balanced_accuracy", "accuracy", "f1"),
) -> pd.DataFrame:
    """Mean ± sample sd (ddof=1; 0 for a single run) of ``metrics`` grouped by ``by``, as
    ``<metric>_mean`` / ``<metric>_sd`` columns plus ``n`` (runs averaged)."""
    g = df.groupby(list(by))
    out = g[list(metrics)].agg(["mean", "std"])
    out.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in out.columns]
    out = out.fillna({f"{m}_sd": 0.0 for m in metrics})
    out["n"] = g.size()
    return out.reset_index()


DEFAULT_COX_PENALTIES = tuple(float(v) for v in np.logspace(-3, 2, 11))


@dataclasses.dataclass
class CoxProbeResult:
    """Test risks (N_test,), the same model's risks on train + val (for ``normalise_fold_risk``),
    the chosen L2 penalty and the validation C-index of every penalty."""

    risk: np.ndarray
    fit_risk: np.ndarray
    best_penalty: float
    val_scores: dict[float, float]


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, penalty: float) -> np.ndarray:
    """(E,) coefficients of a Cox model on standardised features x (N, E): minimises the Breslow
    partial likelihood (``models.survival.cox_ph_loss``, per event) + penalty/2 · ‖β‖² by L-BFGS
    in float64."""
    import torch

    from slidefm.models.survival import cox_ph_loss

    xt = torch.as_tensor(x, dtype=torch.float64)
    t, e = torch.as_tensor(time, dtype=torch.float64), torch.as_tensor(event)
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = (
            cox_ph_loss((xt @ beta).double(), t, e).double() + 0.5 * penalty * beta.square().sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().numpy()


def cox_probe(
    x_train: np.ndarray,
    t_train: np.ndarray,
    e_train: np.ndarray,
    x_val: np.ndarray,
    t_val: np.ndarray,
    e_val: np.ndarray,
    x_test: np.ndarray,
    penalties: Sequence[float] = DEFAULT_COX_PENALTIES,
) -> CoxProbeResult:
    """Standardised embeddings → L2-penalised Cox model; each penalty is fit on train and scored
    by validation C-index, ties going to the larger penalty; the chosen one is refit on
    train + val before scoring test (the linear probe's protocol, for survival)."""
    from slidefm.eval.survival import concordance_index

    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    scores: dict[float, float] = {}
    for p in sorted(penalties, reverse=True):
        c = concordance_index(t_val, e_val, xv @ fit_cox(xt, t_train, e_train, p))
        scores[p] = c if np.isfinite(c) else -np.inf
    best = max(sorted(scores, reverse=True), key=lambda p: scores[p])
    x_all = np.concatenate([x_train, x_val])
    t_all, e_all = np.concatenate([t_train, t_val]), np.concatenate([e_train, e_val])
    scaler = StandardScaler().fit(x_all)
    beta = fit_cox(scaler.transform(x_all), t_all, e_all, best)
    return CoxProbeResult(
        scaler.transform(x_test) @ beta, scaler.transform(x_all) @ beta, best, scores
    )
