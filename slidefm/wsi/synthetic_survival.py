"""Planted survival for the synthetic cohort: per patient, an event time from a proportional-
hazards model whose log-hazard depends on what the slides show, plus independent censoring.

    log-hazard η = hazard_spatial · biomarker_spatial + hazard_necrosis · necrosis_pct
    event time  T = E₁ / (λ₀ · exp η),   λ₀ = ln 2 / median_months   (exponential baseline)
    censoring   C = E₂ / μ,  μ solved so that the expected censored share is ``censoring``
    observed    time = min(T, C) in months (rounded to 0.1, so ties occur), event = T ≤ C

``necrosis_pct`` is the patient's mean over slides of 100 × necrosis cells / tissue cells (the
share of necrosis tiles); ``biomarker_spatial`` is the arrangement label. E₁, E₂ ~ Exp(1) come
from a per-patient generator of their own (stream ``SURVIVAL_STREAM``), so every other column,
slide and report of a cohort keeps its bytes whatever the survival options.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SURVIVAL_STREAM = 3  # np.random.default_rng([seed, case_index, SURVIVAL_STREAM])
SURVIVAL_COLUMNS = ("survival_months", "survival_event")


def censoring_rate_for(hazards: np.ndarray, share: float) -> float:
    """μ of an exponential censoring time such that the mean over patients of
    P(C < T) = μ / (μ + λ_i) equals ``share`` (bisection on log μ); 0 means no censoring."""
    if share <= 0:
        return 0.0
    if share >= 1:
        raise ValueError(f"survival censoring share must be in [0, 1), got {share}")
    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        mu = np.exp(mid)
        if np.mean(mu / (mu + hazards)) < share:
            lo = mid
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2))


def plant_survival(
    cases: pd.DataFrame,
    seed: int,
    hazard_spatial: float,
    hazard_necrosis: float,
    median_months: float,
    censoring: float,
) -> tuple[pd.DataFrame, dict]:
    """``cases`` (one row per patient: ``case_id``, ``case_index``, ``biomarker_spatial``,
    ``necrosis_pct``) → (truth table per patient, the model's constants).

    Truth table columns: case_id, biomarker_spatial, necrosis_pct, log_hazard, event_time,
    censor_time, survival_months, survival_event.
    """
    if median_months <= 0:
        raise ValueError(f"survival median_months must be > 0, got {median_months}")
    eta = hazard_spatial * cases["biomarker_spatial"].to_numpy(
        np.float64
    ) + hazard_necrosis * cases["necrosis_pct"].to_numpy(np.float64)
    lam0 = np.log(2.0) / median_months
    lam = lam0 * np.exp(eta)
    mu = censoring_rate_for(lam, censoring)
    draws = np.array(
        [
            np.random.default_rng([seed, int(i), SURVIVAL_STREAM]).exponential(size=2)
            for i in cases["case_index"]
        ]
    ).reshape(-1, 2)
    t_event = draws[:, 0] / lam
    t_cens = draws[:, 1] / mu if mu > 0 else np.full(len(cases), np.inf)
    observed = np.maximum(np.round(np.minimum(t_event, t_cens), 1), 0.1)
    truth = pd.DataFrame(
        {
            "case_id": cases["case_id"].to_numpy(),
            "biomarker_spatial": cases["biomarker_spatial"].to_numpy(),
            "necrosis_pct": np.round(cases["necrosis_pct"].to_numpy(np.float64), 4),
            "log_hazard": np.round(eta, 6),
            "event_time": np.round(t_event, 4),
            "censor_time": np.round(t_cens, 4),
            "survival_months": observed,
            "survival_event": (t_event <= t_cens).astype(np.int64),
        }
    )
    constants = {"baseline_hazard_per_month": lam0, "censoring_rate_per_month": mu}
    return truth, constants
