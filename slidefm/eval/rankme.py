"""RankMe (Garrido et al., ICML 2023): the effective rank of a set of embeddings, and ODCorr
(kaiko.ai): their mean off-diagonal correlation.

A collapsing self-supervised encoder maps slides onto few directions; RankMe drops towards 1
long before the loss shows it, so pretraining logs it on held-out slide embeddings.
"""

from __future__ import annotations

import numpy as np
import torch


def rankme(embeddings: torch.Tensor | np.ndarray, eps: float = 1e-7) -> float:
    """exp(entropy of the normalised singular values) of an (N, E) embedding matrix.

    p_k = σ_k / Σσ + eps; RankMe = exp(-Σ p_k log p_k). Between 1 and min(N, E): r equal
    singular values give r. Computed in float64 on the uncentred matrix, as in the paper.
    """
    z = torch.as_tensor(embeddings)
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"rankme needs a non-empty (N, E) matrix, got shape {tuple(z.shape)}")
    s = torch.linalg.svdvals(z.detach().to("cpu", torch.float64))
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def odcorr(embeddings: torch.Tensor | np.ndarray) -> float:
    """Mean |off-diagonal| of the (E, E) Pearson correlation matrix of an (N, E) embedding
    matrix (kaiko.ai's ODCorr): 0 for decorrelated dimensions, 1 when every dimension moves
    together (dimensional collapse). Constant dimensions count as uncorrelated."""
    z = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 2:
        raise ValueError(f"odcorr needs an (N ≥ 2, E ≥ 2) matrix, got shape {tuple(z.shape)}")
    z = z - z.mean(0)
    sd = z.norm(dim=0)
    z = z / torch.where(sd > 0, sd, torch.ones_like(sd))
    c = z.t() @ z
    e = c.shape[0]
    return float((c.abs().sum() - c.diagonal().abs().sum()) / (e * (e - 1)))
