"""Losses and risk scores for right-censored survival: Cox partial likelihood and the
discrete-time negative log-likelihood over time bins (PORPOISE/MCAT style).

Shapes and units: ``time`` (B,) follow-up in the manifest's unit (days, months, …), ``event``
(B,) 1 = event observed, 0 = censored. A model's ``logits`` are (B, 1) for ``cox`` (the
log-hazard ratio, higher = riskier) and (B, K) for ``nll`` (one hazard logit per time bin).
Every loss is averaged over the batch so it is comparable across batch sizes; ``risk_from_logits``
turns either head into one risk score (higher = shorter expected survival).

Survival targets travel as one (B, 3) float array ``[time, event, bin]`` (``bin`` is the
quantile time bin of ``time``, used by ``nll`` only), so datasets and collate stay task-agnostic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

SURVIVAL_LOSSES = ("cox", "nll")


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, divided by the number of events:

        −(1/E) Σ_{i: event} [ r_i − log Σ_{j: t_j ≥ t_i} exp(r_j) ]

    Breslow: every subject whose time equals t_i is in the risk set of each tied event. The
    risk-set matrix is (B, B): fine for the batch sizes survival MIL uses (cohorts ≤ a few
    thousand slides). A batch without events carries no information: the loss is 0 (with a
    gradient of zeros, so an optimizer step stays valid).
    """
    risk = risk.reshape(-1).float()
    time = time.reshape(-1).to(risk.device, torch.float64)
    event = event.reshape(-1).to(risk.device).bool()
    if not event.any():
        return risk.sum() * 0.0
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # [i, j]: j is at risk at t_i
    log_denom = torch.logsumexp(risk.unsqueeze(0).masked_fill(~at_risk, float("-inf")), dim=1)
    return -(risk - log_denom)[event].sum() / event.sum()


def discrete_time_nll(
    logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor, alpha: float = 0.0
) -> torch.Tensor:
    """Discrete-time survival NLL over K bins (Zadeh & Schmid 2020, as in PORPOISE/MCAT).

    hazard h_k = sigmoid(logit_k) = P(event in bin k | survived bins < k); S_k = Π_{j≤k}(1 − h_j).
    An event in bin b contributes −log S_{b−1} − log h_b; a subject censored in bin b
    contributes −log S_b (it survived bin b). ``alpha`` up-weights the uncensored terms:
    loss = (1 − alpha)·(all terms) + alpha·(uncensored terms), averaged over the batch.
    """
    logits = logits.float()
    b = bins.reshape(-1).long().to(logits.device)
    e = event.reshape(-1).to(logits.device).float()
    log_h = torch.nn.functional.logsigmoid(logits)  # log h_k
    log_1mh = torch.nn.functional.logsigmoid(-logits)  # log (1 − h_k)
    # log S_k for k = −1..K−1, with S_{−1} = 1.
    log_s = torch.cat([log_1mh.new_zeros(len(b), 1), torch.cumsum(log_1mh, dim=1)], dim=1)
    idx = b.unsqueeze(1)
    s_prev = log_s.gather(1, idx).squeeze(1)  # log S_{b−1}
    s_this = log_s.gather(1, idx + 1).squeeze(1)  # log S_b
    h_this = log_h.gather(1, idx).squeeze(1)
    uncensored = -e * (s_prev + h_this)
    censored = -(1.0 - e) * s_this
    loss = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored
    return loss.mean()


def risk_from_logits(logits: torch.Tensor | np.ndarray, loss: str) -> np.ndarray:
    """(B,) risk, higher = worse: the Cox log-hazard, or for ``nll`` minus the sum of the
    predicted survival curve over the bins (MCAT's risk; monotone in expected survival)."""
    z = torch.as_tensor(logits).float()
    if loss == "cox":
        return z.reshape(len(z), -1)[:, 0].double().numpy()
    surv = torch.cumprod(torch.sigmoid(-z), dim=1)  # S_k = Π (1 − h_j)
    return (-surv.sum(1)).double().numpy()


def quantile_bin_edges(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins + 1,) bin edges at quantiles of the event times (PORPOISE): the first edge is
    0 and the last +inf, so every follow-up time falls in a bin. Needs ≥ 1 event."""
    t = np.asarray(time, dtype=np.float64)[np.asarray(event).astype(bool)]
    if len(t) == 0:
        raise ValueError("quantile time bins need at least one event")
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    inner = np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.concatenate([[0.0], inner, [np.inf]])


def time_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N,) int bin of each time: bin k holds edges[k] ≤ t < edges[k + 1]."""
    k = np.searchsorted(np.asarray(edges)[1:-1], np.asarray(time, dtype=np.float64), side="right")
    return k.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SurvivalObjective:
    """What a survival model is trained on: the loss, its head width and (``nll``) the time
    bins, fixed from the training fold so validation and test use the same bins."""

    loss: str = "cox"
    bin_edges: tuple[float, ...] = ()
    alpha: float = 0.0

    def __post_init__(self):
        if self.loss not in SURVIVAL_LOSSES:
            raise ValueError(
                f"survival loss must be one of {', '.join(SURVIVAL_LOSSES)}, not {self.loss!r}"
            )
        if self.loss == "nll" and len(self.bin_edges) < 2:
            raise ValueError("the nll survival loss needs bin_edges (see quantile_bin_edges)")

    @classmethod
    def fit(
        cls, loss: str, time: np.ndarray, event: np.ndarray, n_bins: int = 4, alpha: float = 0.0
    ) -> SurvivalObjective:
        """The objective for training data (time, event): bins from its event-time quantiles."""
        edges = tuple(quantile_bin_edges(time, event, n_bins).tolist()) if loss == "nll" else ()
        return cls(loss, edges, alpha)

    @property
    def num_outputs(self) -> int:
        return 1 if self.loss == "cox" else len(self.bin_edges) - 1

    def targets(self, time: np.ndarray, event: np.ndarray) -> np.ndarray:
        """(N, 3) float64 ``[time, event, bin]`` (bin 0 for cox)."""
        time = np.asarray(time, dtype=np.float64)
        b = time_bins(time, np.asarray(self.bin_edges)) if self.loss == "nll" else 0 * time
        return np.stack([time, np.asarray(event, dtype=np.float64), b], axis=1)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of (B, num_outputs) logits against (B, 3) targets."""
        target = torch.as_tensor(target)
        if self.loss == "cox":
            return cox_ph_loss(logits[:, 0], target[:, 0], target[:, 1])
        return discrete_time_nll(logits, target[:, 2], target[:, 1], self.alpha)

    def risk(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        return risk_from_logits(logits, self.loss)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "bin_edges": list(self.bin_edges), "alpha": self.alpha}
