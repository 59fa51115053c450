"""`slidefm mil train --task survival` and `slidefm probe --task survival` end to end on small
cohorts with a planted risk, and the planted survival of `slidefm synth-cohort`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored

from slidefm.cli import main
from slidefm.io.embeddings import write_embeddings
from slidefm.io.features import SlideFeatures, grid_from_coords, write_features

D = 8
WITNESS = (np.ones(D) / np.sqrt(D)).astype(np.float32)


def _follow_up(rng, z, censor=0.25):
    """Exponential event times with log-hazard 1.5·z, independent exponential censoring."""
    t = rng.exponential(10.0 * np.exp(-1.5 * z))
    c = rng.exponential(10.0 / censor, size=len(z))
    return np.round(np.minimum(t, c), 1) + 0.1, (t <= c).astype(int)


def make_bag_cohort(root, n_patients=48, seed=0):
    """Patients with 1–2 slides; a latent risk z shifts 8 tiles along WITNESS by 3·z, so
    any bag model can read it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n_patients)
    time, event = _follow_up(rng, z)
    rows = []
    for p in range(n_patients):
        for s in range(1 + p % 3 // 2):
            sid = f"P{p:02d}_S{s}"
            n = int(rng.integers(12, 30))
            cells = rng.choice(64, n, replace=False)
            coords = np.stack([cells % 8, cells // 8], 1).astype(np.int64) * 512
            feats = rng.normal(size=(n, D)).astype(np.float32)
            feats[:8] += 3.0 * z[p] * WITNESS
            attrs = {"encoder": "toy", "encoder_weights": "random", "target_mpp": 0.5}
            attrs |= {"patch_size": 256, "patch_size_level0": 512, "config_hash": "t", "seed": 0}
            write_features(
                root / "features" / f"{sid}.h5",
                SlideFeatures(
                    sid, feats, coords, grid_from_coords(coords, 512), np.ones(n, np.float32), attrs
                ),
            )
            rows.append({"slide_id": sid, "case_id": f"P{p:02d}", "os": time[p], "dead": event[p]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv", root / "features"


def mil_survival(manifest, feats, out, *extra):
    argv = ["mil", "train", "--task", "survival", "--manifest", str(manifest)]
    argv += ["--features", str(feats), "--time", "os", "--event", "dead", "--out", str(out)]
    fast = ["--folds", "3", "--epochs", "8", "--no-progress", "--set", "n_boot=100"]
    return main([*argv, *fast, "--set", "model_kwargs={hidden: 32}", "--lr", "0.003", *extra])


@pytest.mark.parametrize(
    "loss,extra",
    [("cox", []), ("nll", ["--model", "mean", "--lr", "0.01", "--epochs", "12"])],
)
def test_mil_survival_cv_outputs(tmp_path, loss, extra):
    manifest, feats = make_bag_cohort(tmp_path)
    out = tmp_path / "run"
    assert mil_survival(manifest, feats, out, "--set", f"survival_loss={loss}", *extra) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["level"] == "patient" and res["n_slides_or_patients"] == 48
    c = res["summary"]["c_index"]
    assert c["lo"] <= c["value"] <= c["hi"] and c["value"] > 0.6  # the planted risk is learnt
    assert len([k for k in res["summary"] if k.startswith("auc@")]) == 3
    pat = pd.read_csv(out / "patient_predictions.csv")
    assert len(pat) == 48 and pat["case_id"].is_unique
    # The headline C-index is the C-index of the CSV's out-of-fold risks (sksurv reference).
    ref = concordance_index_censored(pat["event"].astype(bool), pat["time"], pat["risk"])[0]
    assert c["value"] == pytest.approx(ref)
    splits = pd.read_csv(out / "splits.csv")
    for _, part in splits.groupby(["seed", "fold"]):
        assert (part.groupby("case_id")["split"].nunique() == 1).all()
    assert (out / "km_seed0.png").read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite(res["per_seed"][0]["logrank_p"])
    meta = json.loads((out / "seed0" / "fold0" / "meta.json").read_text())
    assert meta["survival"]["loss"] == loss and meta["num_classes"] == (1 if loss == "cox" else 4)
    # A finished run is reused, and a survival checkpoint is refused by `mil predict`.
    assert mil_survival(manifest, feats, out, "--set", f"survival_loss={loss}", *extra) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "patient_predictions.csv"), pat)
    argv = ["mil", "predict", "--checkpoint", str(out), "--manifest", str(manifest)]
    argv += ["--features", str(feats), "--out", str(tmp_path / "p.csv"), "--no-progress"]
    assert main(argv) == 2


def test_mil_survival_slide_encoder_and_errors(tmp_path, capsys):
    manifest, feats = make_bag_cohort(tmp_path, n_patients=24)
    extra = ["--model", "slide_encoder", "--slide-encoder", "tiny", "--set", "head_epochs=5"]
    extra += ["--set", "model_kwargs={}"]  # (the helper sets an MLP width slide_encoder lacks)
    assert mil_survival(manifest, feats, tmp_path / "se", *extra) == 0
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    df = pd.read_csv(manifest)
    bad = tmp_path / "bad.csv"
    df.assign(dead=0).to_csv(bad, index=False)
    capsys.readouterr()
    assert mil_survival(bad, feats, tmp_path / "x") == 2
    assert "no events" in capsys.readouterr().err
    df.assign(os=-df["os"]).to_csv(bad, index=False)
    assert mil_survival(bad, feats, tmp_path / "x") == 2
    assert "negative" in capsys.readouterr().err
    argv = ["mil", "train", "--task", "survival", "--manifest", str(manifest)]
    assert main([*argv, "--features", str(feats), "--out", str(tmp_path / "y")]) == 2
    assert "--time COL and --event COL" in capsys.readouterr().err


def test_probe_survival_cox(tmp_path):
    rng = np.random.default_rng(1)
    n = 90
    z = rng.normal(size=n)
    time, event = _follow_up(rng, z)
    df = pd.DataFrame(
        {"slide_id": [f"s{i}" for i in range(n)], "case_id": [f"p{i}" for i in range(n)]}
    ).assign(os=time, dead=event)
    df.to_csv(tmp_path / "m.csv", index=False)
    emb = rng.normal(size=(n, 12))
    emb[:, 0] += 1.5 * z
    attrs = {"checkpoint_sha256": "random", "seed": 0, "encoder_config": "tiny"}
    write_embeddings(tmp_path / "e.h5", df["slide_id"].tolist(), emb.astype(np.float32), attrs)
    argv = ["probe", "--task", "survival", "--embeddings", str(tmp_path / "e.h5")]
    argv += ["--manifest", str(tmp_path / "m.csv"), "--time", "os", "--event", "dead"]
    argv += [
        "--out",
        str(tmp_path / "o"),
        "--folds",
        "3",
        "--seeds",
        "0",
        "--n-boot",
        "100",
        "--no-progress",
    ]
    assert main(argv) == 0
    res = json.loads((tmp_path / "o" / "cox_results.json").read_text())
    assert res["n_folds"] == 3 and len(res["chosen_penalty"]) == 3
    oracle = concordance_index_censored(event.astype(bool), time, z)[0]
    assert res["summary"]["c_index"]["value"] > 0.6
    assert res["summary"]["c_index"]["value"] < oracle + 0.05  # cannot beat the true risk much
    assert (tmp_path / "o" / "cox_km_seed0.png").is_file()


def test_synth_cohort_plants_survival(tmp_path):
    from slidefm.wsi.synthetic import generate_cohort

    opts = dict(cells=8, cell_px=32, pen_prob=0.0)
    m = generate_cohort(tmp_path / "a", 40, seed=2, workers=1, progress=False, **opts)
    truth = pd.read_csv(tmp_path / "a" / "survival.csv")
    assert len(truth) == m["case_id"].nunique()
    per_case = m.drop_duplicates("case_id").set_index("case_id")
    t = truth.set_index("case_id")
    assert (per_case["survival_months"] == t["survival_months"]).all()
    assert (
        t["log_hazard"] - (2.0 * t["biomarker_spatial"] + 0.3 * t["necrosis_pct"])
    ).abs().max() < 1e-4
    assert np.allclose(
        t["survival_months"], np.maximum(np.round(np.minimum(t.event_time, t.censor_time), 1), 0.1)
    )
    assert ((t.event_time <= t.censor_time).astype(int) == t.survival_event).all()
    gt = (tmp_path / "a" / "GROUND_TRUTH.md").read_text()
    c = concordance_index_censored(t.survival_event.astype(bool), t.survival_months, t.log_hazard)[
        0
    ]
    assert (
        f"true-risk C-index** (Harrell, the log-hazard itself on the observed follow-up): **{c:.4f}**"
        in gt
    )
    # Survival options change only the survival columns; everything else keeps its bytes.
    m2 = generate_cohort(
        tmp_path / "b",
        40,
        seed=2,
        workers=1,
        progress=False,
        hazard_spatial=0.0,
        censoring=0.6,
        **opts,
    )
    keep = [c for c in m.columns if not c.startswith("survival_")]
    pd.testing.assert_frame_equal(m[keep], m2[keep])
    assert not m["survival_months"].equals(m2["survival_months"])
    assert (
        m2.drop_duplicates("case_id")["survival_event"].mean()
        < m.drop_duplicates("case_id")["survival_event"].mean()
    )
    for name in ("cells.csv", "reports.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for p in (tmp_path / "a" / "slides").glob("*.tiff"):
        assert p.read_bytes() == (tmp_path / "b" / "slides" / p.name).read_bytes()
