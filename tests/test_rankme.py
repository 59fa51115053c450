"""RankMe against hand computations and rank-r matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slidefm.eval.rankme import rankme


def test_hand_computed_two_singular_values():
    z = np.diag([3.0, 1.0])  # σ = (3, 1) → p = (0.75, 0.25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert rankme(z, eps=0) == pytest.approx(math.exp(h), rel=1e-12)
    assert rankme(z) == pytest.approx(math.exp(h), rel=1e-5)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_equal_singular_values_give_the_rank(r):
    # Orthonormal U (50×r) and V (16×r): U·diag(5)·Vᵀ has r equal singular values.
    g = torch.Generator().manual_seed(r)
    u, _ = torch.linalg.qr(torch.randn(50, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, r, generator=g, dtype=torch.float64))
    z = u @ (5 * torch.eye(r, dtype=torch.float64)) @ v.T
    assert rankme(z) == pytest.approx(r, rel=1e-4)


def test_collapse_is_low_and_isotropic_is_high():
    rng = np.random.default_rng(0)
    iso = rng.normal(size=(500, 32))
    collapsed = np.outer(rng.normal(size=500), rng.normal(size=32)) + 1e-4 * iso
    assert rankme(iso) > 28
    assert rankme(collapsed) < 1.1
    with pytest.raises(ValueError):
        rankme(np.zeros((0, 4)))
