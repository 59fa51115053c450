"""The calibrated out-of-domain test of zero-shot inputs (slidefm.eval.ood)."""

from __future__ import annotations

import numpy as np
import pytest

from slidefm.eval.ood import DomainReference, conformal_pvalues, knn_similarity


def test_knn_similarity_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(7, 5)), rng.normal(size=(20, 5))
    got = knn_similarity(q, r, k=3)
    for i in range(7):
        cos = [q[i] @ r[j] / np.linalg.norm(q[i]) / np.linalg.norm(r[j]) for j in range(20)]
        assert got[i] == pytest.approx(np.mean(sorted(cos)[-3:]), abs=1e-6)
    loo = knn_similarity(r, r, k=2, exclude_self=True)
    for i in range(20):
        cos = [
            r[i] @ r[j] / np.linalg.norm(r[i]) / np.linalg.norm(r[j]) for j in range(20) if j != i
        ]
        assert loo[i] == pytest.approx(np.mean(sorted(cos)[-2:]), abs=1e-6)


def test_conformal_pvalue_formula():
    cal = np.array([0.5, 0.7, 0.9, 0.1])
    # p = (1 + #{c <= s}) / (n + 1)
    np.testing.assert_allclose(
        conformal_pvalues([0.0, 0.5, 0.8, 1.0], cal), [1 / 5, 3 / 5, 4 / 5, 1]
    )


def _clusters(rng, n, centre, spread=0.6):
    return centre + spread * rng.normal(size=(n, len(centre)))


def test_in_domain_false_alarms_stay_near_alpha_and_other_domains_are_flagged():
    """Reference: training slides of 4 subtype clusters; calibration: validation slides of the
    same clusters. Fresh in-domain slides are flagged at about alpha (the conformal
    guarantee, checked over 2000 draws); slides of a fifth, unseen cluster (another organ)
    all are."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16)) * 2

    def draw(n, ks):
        return np.concatenate([_clusters(rng, n, centres[k]) for k in ks])

    ref = DomainReference.build(draw(60, range(4)), draw(25, range(4)), k=5)
    assert ref.calibrated_on == "validation slides" and len(ref.calibration) == 100
    _, p_in, flag_in = ref.test(draw(500, range(4)), alpha=0.05)
    assert 0.02 <= flag_in.mean() <= 0.09
    sim_out, _, flag_out = ref.test(draw(50, [4]), alpha=0.05)
    assert flag_out.all()
    assert sim_out.max() < np.quantile(ref.calibration, 0.05)
    # round trip through the checkpoint form (float16 reference)
    again = DomainReference.from_dict(ref.to_dict())
    np.testing.assert_array_equal(again.test(draw(20, [4]))[2], True)


def test_few_validation_slides_fall_back_to_leave_one_out():
    rng = np.random.default_rng(2)
    ref = DomainReference.build(rng.normal(size=(30, 8)), rng.normal(size=(3, 8)), k=3)
    assert ref.calibrated_on.startswith("training slides") and len(ref.calibration) == 30
    with pytest.raises(ValueError, match="at least 2"):
        DomainReference.build(rng.normal(size=(1, 8)))
