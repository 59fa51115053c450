"""`slidefm probe` end to end on slide embeddings written here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from slidefm.cli import main
from slidefm.io.embeddings import write_embeddings


def cohort(tmp_path, n_patients=40, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    rows, embs = [], []
    for p in range(n_patients):
        lab = p % 2
        for s in range(1 + p % 3 // 2):
            rows.append(
                {"slide_id": f"P{p}_S{s}", "case_id": f"P{p}", "subtype": ["luad", "lusc"][lab]}
            )
            e = rng.normal(size=16)
            e[0] += sep * lab
            embs.append(e)
    df = pd.DataFrame(rows)
    manifest = tmp_path / "manifest.csv"
    df.to_csv(manifest, index=False)
    emb = tmp_path / "emb.h5"
    order = rng.permutation(len(df))  # file order differs from manifest order
    write_embeddings(
        emb,
        df["slide_id"].to_numpy()[order].tolist(),
        np.asarray(embs, np.float32)[order],
        {"checkpoint_sha256": "random", "seed": 0, "encoder_config": "tiny"},
    )
    return manifest, emb, df, np.asarray(embs)


def probe(emb, manifest, out, *extra) -> int:
    """``slidefm probe`` on the ``subtype`` label (no progress bar); returns the exit code."""
    argv = ["probe", "--embeddings", str(emb), "--manifest", str(manifest), "--label", "subtype"]
    return main([*argv, "--out", str(out), *extra, "--no-progress"])


def test_probe_cli_outputs_and_numbers(tmp_path, capsys):
    manifest, emb, df, x = cohort(tmp_path)
    out = tmp_path / "probe"
    cv = ["--folds", "3", "--seeds", "0,1", "--shots", "1,4,64", "--draws", "5"]
    assert probe(emb, manifest, out, *cv, "--n-boot", "100") == 0
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    summ = json.loads((out / "summary.json").read_text())
    assert summ["random_weights"] is True
    assert summ["probes"]["linear"]["auroc"]["value"] > 0.85
    assert summ["probes"]["knn"]["auroc"]["value"] > 0.8
    fs = pd.read_csv(out / "fewshot_summary.csv")
    assert list(fs["k"]) == [1, 4]  # 64 shots per class exceed the training pool: skipped
    assert (fs["n"] == 5 * 3 * 2).all()
    preds = pd.read_csv(out / "predictions.csv")
    # embeddings were matched by slide_id, not file order: check one kNN row by hand
    row = preds[(preds.probe == "knn") & (preds.seed == 0)].iloc[0]
    splits = pd.read_csv(out / "splits.csv")
    part = splits[(splits.seed == 0) & (splits.fold == row["fold"])]
    memory = part[part.split != "test"]["slide_id"].tolist()
    pos = {s: i for i, s in enumerate(df["slide_id"])}
    xm = x[[pos[s] for s in memory]]
    q = x[pos[row["slide_id"]]]
    sims = (xm @ q) / np.linalg.norm(xm, axis=1) / np.linalg.norm(q)
    nn = np.argsort(-sims, kind="stable")[:20]
    frac = np.mean(df.set_index("slide_id").loc[[memory[i] for i in nn], "subtype"] == "lusc")
    assert row["prob_lusc"] == pytest.approx(frac)
    for name in ("linear", "knn"):
        assert (out / f"{name}_roc_seed0.png").is_file() and (
            out / f"{name}_fold_metrics.csv"
        ).is_file()
    # the same splits can be reused (e.g. from a MIL run) and give identical partitions
    out2 = tmp_path / "probe2"
    reuse = ["--splits", str(out / "splits.csv"), "--seeds", "1", "--probes", "linear"]
    assert probe(emb, manifest, out2, *reuse, "--n-boot", "50") == 0
    s1 = pd.read_csv(out / "splits.csv").query("seed == 1").reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_csv(out2 / "splits.csv"), s1)


def test_probe_errors(tmp_path, capsys):
    manifest, emb, df, _ = cohort(tmp_path, n_patients=10)
    extra = pd.concat([df, pd.DataFrame([{"slide_id": "NEW", "case_id": "PX", "subtype": "luad"}])])
    m2 = tmp_path / "m2.csv"
    extra.to_csv(m2, index=False)
    assert probe(emb, m2, tmp_path / "o") == 2
    assert "NEW" in capsys.readouterr().err
    assert probe(emb, manifest, tmp_path / "o", "--probes", "svm") == 2
    assert "svm" in capsys.readouterr().err
