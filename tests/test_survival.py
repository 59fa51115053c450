"""Survival losses and metrics against independent references: scikit-survival's C-index and
time-dependent AUC, a hand-computed Breslow partial likelihood, scikit-survival's Cox fit, a
naive discrete-time likelihood; manifest follow-up errors; event-stratified patient folds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.metrics import cumulative_dynamic_auc as sksurv_auc
from sksurv.util import Surv

from slidefm.eval.metrics import auroc
from slidefm.eval.probes import fit_cox
from slidefm.eval.splits import make_cv_splits
from slidefm.eval.survival import (
    concordance_index,
    cumulative_dynamic_auc,
    km_risk_groups_png,
    logrank_groups,
    normalise_fold_risk,
    patient_risks,
)
from slidefm.io.manifest import ManifestError, check_survival
from slidefm.models.survival import (
    SurvivalObjective,
    cox_ph_loss,
    discrete_time_nll,
    quantile_bin_edges,
    risk_from_logits,
    time_bins,
)


def _censored_data(seed: int, n: int = 90):
    """Integer times (many ties), ~40 % censored, risks rounded to one decimal (risk ties);
    the largest time is an event so the censoring KM stays positive (sksurv requires it)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 15, n).astype(float)
    e = rng.random(n) < 0.6
    e[t == t.max()] = True
    r = np.round(rng.normal(size=n) - 0.1 * t * rng.random(), 1)
    return t, e, r


@pytest.mark.parametrize("seed", range(6))
def test_c_index_and_td_auc_equal_scikit_survival(seed):
    t, e, r = _censored_data(seed)
    assert len(np.unique(t)) < len(t) and len(np.unique(r)) < len(r)  # ties of both kinds
    want = concordance_index_censored(e, t, r)[0]
    assert concordance_index(t, e, r) == pytest.approx(want, abs=1e-12)
    y = Surv.from_arrays(e, t)
    horizons = [3.0, 7.0, 11.5]
    got = [cumulative_dynamic_auc(t, e, r, h) for h in horizons]
    np.testing.assert_allclose(got, sksurv_auc(y, y, r, horizons)[0], atol=1e-12)


def test_c_index_edge_cases_and_td_auc_without_censoring():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.ones(4)
    assert concordance_index(t, e, -t) == 1.0  # earlier failure = higher risk
    assert concordance_index(t, e, t) == 0.0
    assert concordance_index(t, e, np.zeros(4)) == 0.5
    assert np.isnan(concordance_index(t, np.zeros(4), t))  # no event: nothing comparable
    # Without censoring the IPCW AUC is the plain AUROC of "event by h" vs "after h".
    rng = np.random.default_rng(0)
    tt, rr = rng.exponential(size=50), rng.normal(size=50)
    assert cumulative_dynamic_auc(tt, np.ones(50), rr, 0.7) == pytest.approx(
        auroc((tt <= 0.7).astype(int), rr)
    )


def test_cox_loss_equals_hand_computed_breslow_partial_likelihood():
    r = torch.tensor([0.5, -0.2, 0.1, 0.3])
    t = torch.tensor([1.0, 2.0, 2.0, 3.0])
    ex = [math.exp(v) for v in r.tolist()]
    # Events at 1, 2 (subject 1) and 3; subject 2 censored at 2 is still at risk at t=2.
    e = torch.tensor([1, 1, 0, 1])
    ll = (0.5 - math.log(sum(ex))) + (-0.2 - math.log(ex[1] + ex[2] + ex[3])) + 0.0
    assert cox_ph_loss(r, t, e).item() == pytest.approx(-ll / 3, rel=1e-6)
    # Breslow ties: two events at t=2 share the risk set {1, 2, 3}.
    e = torch.tensor([1, 1, 1, 0])
    denom = math.log(ex[1] + ex[2] + ex[3])
    ll = (0.5 - math.log(sum(ex))) + (-0.2 - denom) + (0.1 - denom)
    assert cox_ph_loss(r, t, e).item() == pytest.approx(-ll / 3, rel=1e-6)
    # No event in the batch: zero loss, zero (finite) gradient.
    rr = r.clone().requires_grad_(True)
    cox_ph_loss(rr, t, torch.zeros(4)).backward()
    assert rr.grad is not None and torch.all(rr.grad == 0)
    # Shift invariance (the reason fold risks are normalised before pooling).
    e = torch.tensor([1, 1, 0, 1])
    assert cox_ph_loss(r + 5, t, e).item() == pytest.approx(cox_ph_loss(r, t, e).item(), rel=1e-5)


def test_cox_fit_matches_scikit_survival_breslow():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 3))
    t = np.round(rng.exponential(np.exp(-(x @ [0.8, -0.5, 0.0]))), 1) + 0.1  # ties
    e = rng.random(120) < 0.7
    ref = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x, Surv.from_arrays(e, t))
    np.testing.assert_allclose(fit_cox(x, t, e, 0.0), ref.coef_, atol=1e-4)
    # The L2 penalty shrinks: sksurv's alpha penalises ½·alpha·‖β‖² of the *summed* loss.
    ref = CoxPHSurvivalAnalysis(alpha=5.0, ties="breslow").fit(x, Surv.from_arrays(e, t))
    np.testing.assert_allclose(fit_cox(x, t, e, 5.0 / e.sum()), ref.coef_, atol=1e-4)


def test_discrete_time_nll_equals_naive_likelihood():
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(7, 4)))
    bins = torch.tensor([0, 1, 3, 2, 0, 3, 1])
    event = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    for alpha in (0.0, 0.4):
        total = 0.0
        for lg, b, ev in zip(logits.tolist(), bins.tolist(), event.tolist()):
            h = [1 / (1 + math.exp(-v)) for v in lg]
            surv_before = math.prod(1 - h[k] for k in range(b))
            if ev:  # the event happened in bin b
                term = -math.log(surv_before * h[b])
                total += term
            else:  # survived through bin b
                term = -math.log(surv_before * (1 - h[b]))
                total += (1 - alpha) * term
        got = discrete_time_nll(logits, bins, event, alpha).item()
        assert got == pytest.approx(total / 7, rel=1e-6)


def test_quantile_bins_and_risk():
    t = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 100])
    e = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0])
    edges = quantile_bin_edges(t, e, 4)
    assert edges[0] == 0 and np.isinf(edges[-1]) and len(edges) == 5
    b = time_bins(t, edges)
    assert b.min() == 0 and b.max() == 3 and np.all(np.diff(b) >= 0)
    assert np.bincount(b[:8]).tolist() == [2, 2, 2, 2]  # event times split into quartiles
    obj = SurvivalObjective.fit("nll", t, e, 4)
    assert obj.num_outputs == 4 and obj.targets(t, e)[:, 2].tolist() == b.tolist()
    # nll risk: a higher hazard in every bin is a higher risk; cox risk is the logit itself
    lo, hi = torch.zeros(1, 4), torch.ones(1, 4)
    assert risk_from_logits(hi, "nll")[0] > risk_from_logits(lo, "nll")[0]
    assert risk_from_logits(torch.tensor([[0.3]]), "cox")[0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least one event"):
        quantile_bin_edges(t, 0 * e, 4)
    with pytest.raises(ValueError, match="survival loss"):
        SurvivalObjective("weibull")


def _manifest(**cols):
    base = {"slide_id": ["a", "b", "c", "d"], "case_id": ["p1", "p1", "p2", "p3"]}
    return pd.DataFrame({**base, **cols})


def test_manifest_follow_up_errors():
    ok = _manifest(t=[5.0, 5.0, 3.0, 0.0], e=["1", "1", "0", "True"])
    time, event = check_survival(ok, "t", "e")
    assert time.tolist() == [5, 5, 3, 0] and event.tolist() == [1, 1, 0, 1]
    cases = [
        (_manifest(t=[5, 5, -3, 1], e=[1, 1, 0, 1]), "negative time"),
        (_manifest(t=[5, 5, None, 1], e=[1, 1, 0, 1]), "missing or not a number.*c"),
        (_manifest(t=[5, 5, "soon", 1], e=[1, 1, 0, 1]), "missing or not a number"),
        (_manifest(t=[5, 5, 3, 1], e=[1, 1, 2, 1]), r"must be 1 \(event\) or 0"),
        (_manifest(t=[5, 5, 3, 1], e=[1, 1, None, 1]), r"must be 1 \(event\) or 0"),
        (_manifest(t=[5, 5, 3, 1], e=[0, 0, 0, 0]), "no events"),
        (_manifest(t=[5, 6, 3, 1], e=[1, 1, 0, 1]), "disagree.*p1"),
        (_manifest(t=[5, 5, 3, 1]), "no --event column 'e'"),
    ]
    for df, msg in cases:
        with pytest.raises(ManifestError, match=msg):
            check_survival(df, "t", "e")


def test_event_stratified_folds_never_share_a_patient():
    rng = np.random.default_rng(3)
    rows = []
    for p in range(60):
        ev = int(rng.random() < 0.3)
        rows += [{"slide_id": f"P{p}_{s}", "case_id": f"P{p}", "ev": ev} for s in range(1 + p % 3)]
    df = pd.DataFrame(rows)
    splits = make_cv_splits(df, "ev", n_folds=5, seeds=(0, 1))
    for _, part in splits.groupby(["seed", "fold"]):
        assert (part.groupby("case_id")["split"].nunique() == 1).all()
        test = part[part.split == "test"].drop_duplicates("case_id")
        share = df.drop_duplicates("case_id")["ev"].mean()
        assert abs(test["stratum"].astype(int).mean() - share) < 0.15  # stratified by event
    for _, part in splits.groupby("seed"):  # every patient tested exactly once per seed
        tested = part[part.split == "test"]
        assert sorted(tested["slide_id"]) == sorted(df["slide_id"])


def test_normalise_patients_logrank_and_km_png(tmp_path):
    fit = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(normalise_fold_risk([3.0, 5.0], fit), [0.0, 2 / np.std(fit)])
    slides = pd.DataFrame(
        {
            "seed": 0,
            "fold": 0,
            "case_id": ["p1", "p1", "p2"],
            "time": [4.0, 4.0, 2.0],
            "event": [1, 1, 0],
            "risk": [1.0, 3.0, 0.5],
        }
    )
    pat = patient_risks(slides)
    assert pat["risk"].tolist() == [2.0, 0.5] and pat["n_slides"].tolist() == [2, 1]
    # Well separated groups: tiny log-rank p (reference: chi-square of the classic statistic).
    rng = np.random.default_rng(4)
    risk = np.r_[np.ones(40), -np.ones(40)]
    t = np.r_[rng.exponential(1, 40), rng.exponential(6, 40)]
    e = rng.random(80) < 0.8
    stats = logrank_groups(pd.DataFrame({"time": t, "event": e, "risk": risk}))
    assert stats["n_high"] == 40 and stats["logrank_p"] < 1e-4
    assert stats["logrank_p"] == pytest.approx(_naive_logrank_p(t, e, risk > 0), rel=1e-6)
    png = km_risk_groups_png(t, e, risk, tmp_path / "km.png", "test", time_label="months")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _naive_logrank_p(t, e, group):
    """Two-group log-rank test written out: Σ(O − E) over event times, hypergeometric variance."""
    from scipy.stats import chi2

    o_minus_e, var = 0.0, 0.0
    for u in np.unique(t[e]):
        at = t >= u
        n, n1 = at.sum(), (at & group).sum()
        d = ((t == u) & e).sum()
        d1 = ((t == u) & e & group).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    return float(chi2.sf(o_minus_e**2 / var, 1))
