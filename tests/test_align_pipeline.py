"""``slidefm align`` → ``zero-shot`` → ``retrieve`` end to end on a tiny toy cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from train_utils import fast_train, set_args

from slidefm.cli import main
from slidefm.io.embeddings import write_embeddings
from slidefm.io.features import SlideFeatures, write_features
from slidefm.models.clip import SlideTextModel
from slidefm.train.align import run_align

SUBTYPES = ("adenocarcinoma", "small_cell", "spindle_cell", "papillary")
TERMS = {
    "adenocarcinoma": "adenocarcinoma",
    "small_cell": "small cell carcinoma",
    "spindle_cell": "spindle cell neoplasm",
    "papillary": "papillary carcinoma",
}
FAST = fast_train(batch_size=8)


def toy_cohort(folder, n_cases=48, dim=64, seed=0, two_slide_cases=4, encoder="toy"):
    """Cases with one subtype each; slide features carry the subtype in their mean; reports
    name it among filler sentences. Returns (manifest path, features dir, embeddings H5)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(SUBTYPES), dim))
    feats_dir = folder / "features"
    feats_dir.mkdir()
    rows, emb_ids, embs = [], [], []
    for c in range(n_cases):
        k = c % len(SUBTYPES)
        split = ("train", "train", "train", "train", "val", "test")[c % 6]
        site = ["left lung", "colon", "soft tissue", "thyroid"][rng.integers(4)]
        report = (
            f"Specimen: {site}, resection. Final diagnosis: {TERMS[SUBTYPES[k]]}. "
            f"Margins are {'free' if rng.random() < 0.5 else 'involved'}. "
            f"{rng.integers(1, 20)} lymph nodes examined."
        )
        for s in range(2 if c < two_slide_cases else 1):
            sid = f"case{c:03d}_s{s}"
            n = int(rng.integers(20, 40))
            grid = np.stack([rng.permutation(64)[:n] % 8, rng.permutation(64)[:n] // 8], 1)
            f = means[k] + rng.normal(size=(n, dim))
            sf = SlideFeatures(
                slide_id=sid,
                features=f.astype(np.float32),
                coords=grid.astype(np.int64) * 256,
                grid=grid.astype(np.int32),
                tissue_fraction=np.ones(n, np.float32),
                attrs=dict(encoder=encoder, encoder_weights="random", target_mpp=0.5,
                           patch_size=256, patch_size_level0=256, config_hash="t", seed=seed),
            )  # fmt: skip
            write_features(feats_dir / f"{sid}.h5", sf)
            emb_ids.append(sid)
            embs.append(f.mean(0))
            rows.append(dict(slide_id=sid, case_id=f"case{c:03d}", path=f"{sid}.tiff",
                             subtype=SUBTYPES[k], report=report, split=split))  # fmt: skip
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    h5 = write_embeddings(
        folder / "emb.h5",
        emb_ids,
        np.array(embs),
        {"checkpoint_sha256": "toy", "seed": seed, "encoder_config": "toy-mean"},
    )
    return manifest, feats_dir, h5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return toy_cohort(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def aligned(cohort, tmp_path_factory):
    """Heads + text tower on precomputed embeddings, long enough to learn the toy task."""
    manifest, _, h5 = cohort
    out = tmp_path_factory.mktemp("align")
    args = ["align", "--config", "tiny", "--embeddings", str(h5), "--manifest", str(manifest)]
    sets = ["train.max_steps=80", "train.progress=false", "data.batch_size=16",
            "train.eval_every=20", "train.ckpt_every=40", "model.embed_dim=32",
            "data.val_label_column=subtype",
            "model.text.width=32", "model.text.heads=2", "model.text.output_dim=32",
            "model.text.context_length=48"]  # fmt: skip
    rc = main(args + ["--out", str(out), "--seed", "1"] + set_args(sets))
    assert rc == 0
    return out


def test_align_outputs_and_no_test_patients(aligned, cohort):
    info = json.loads((aligned / "run_config.json").read_text())
    assert info["seed"] == 1 and info["steps"] == 80 and info["tokenizer_trained_here"]
    manifest = pd.read_csv(cohort[0])
    assert info["num_train_cases"] == manifest[manifest.split == "train"].case_id.nunique()
    rows = pd.read_csv(aligned / "metrics.csv")
    assert {"loss", "val_loss", "val_s2r_recall@5", "logit_scale"} <= set(rows.columns)
    assert rows["loss"].iloc[-1] < rows["loss"].iloc[0]
    assert (aligned / "loss_curve.png").is_file() and (aligned / "align.pt").is_file()
    # the tokenizer saw training reports only: a term used only in a test report is not a piece
    model = SlideTextModel.from_checkpoint(aligned / "align.pt")
    assert model.checkpoint_extra["seed"] == 1


@pytest.mark.slow
def test_zero_shot_and_retrieval_learn_the_toy_task(aligned, cohort, tmp_path):
    manifest, _, h5 = cohort
    ckpt = str(aligned / "align.pt")
    out = tmp_path / "zs"
    rc = main(["zero-shot", "--checkpoint", ckpt, "--embeddings", str(h5), "--prompts",
               "synthetic_subtypes", "--manifest", str(manifest), "--label-column", "subtype",
               "--split", "test", "--out", str(out), "--n-boot", "200"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"]["balanced_accuracy"]["value"] >= 0.75  # chance 0.25; unseen templates
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == (pd.read_csv(manifest).split == "test").sum()
    ret = {}
    for backend in ("exact", "faiss", "qdrant"):
        o = tmp_path / f"ret_{backend}"
        rc = main(["retrieve", "--checkpoint", ckpt, "--embeddings", str(h5), "--manifest",
                   str(manifest), "--label-column", "subtype", "--split", "test", "--backend",
                   backend, "--out", str(o), "--n-boot", "50",
                   "--query", "small cell carcinoma"])  # fmt: skip
        assert rc == 0
        ret[backend] = json.loads((o / "metrics.json").read_text())["metrics"]
        assert (o / "neighbours_slide2report.csv").is_file() and (o / "text_queries.csv").is_file()
    # same point values (near-tied reports may swap places in float32, changing a CI draw)
    for backend in ("faiss", "qdrant"):
        for task, m in ret["exact"].items():
            for name, v in m.items():
                n = m["num_queries"]["value"]
                assert abs(ret[backend][task][name]["value"] - v["value"]) <= 1 / n + 1e-9
    # 8 test patients, 2 per subtype: a report of the right subtype is in the top 5 of most
    assert ret["exact"]["slide2report"]["recall@5"]["value"] >= 0.7
    assert ret["exact"]["slide2slide"]["map@5"]["value"] > 0.5
    assert (tmp_path / "ret_qdrant" / "qdrant").is_dir()


@pytest.mark.slow
def test_features_mode_partial_encoder_resumes_exactly(cohort, tmp_path):
    manifest, feats, _ = cohort
    over = FAST + ["slide_encoder=random:tiny", "model.slide_trainable=partial",
                   "data.max_tiles=16"]  # fmt: skip
    full = run_align("tiny", manifest, tmp_path / "a", features=feats, overrides=over)
    assert full["slide_encoder_weights"] == "random" and full["tile_encoder_weights"] == "random"
    run_align("tiny", manifest, tmp_path / "b", features=feats, overrides=over, stop_at_step=4)
    resumed = run_align("tiny", manifest, tmp_path / "b", features=feats, overrides=over)
    assert resumed["steps"] == 6
    a = torch.load(tmp_path / "a" / "align.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "align.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the encoder's last block trained, its first did not
    model = SlideTextModel.from_checkpoint(tmp_path / "a" / "align.pt")
    assert model.trainable_encoder_params and all(
        "blocks.0." not in n for n in model.trainable_encoder_params
    )
    # zero-shot straight from tile features through the checkpoint's slide encoder
    rc = main(["zero-shot", "--checkpoint", str(tmp_path / "a" / "align.pt"), "--features",
               str(feats), "--prompts", "synthetic_subtypes", "--manifest", str(manifest),
               "--label-column", "subtype", "--split", "val", "--out", str(tmp_path / "zs"),
               "--n-boot", "20"])  # fmt: skip
    assert rc == 0
    zs = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert zs["slide_encoder_weights"] == "random" and zs["tile_encoder_weights"] == "random"


def test_clear_errors(cohort, tmp_path):
    manifest, feats, h5 = cohort
    with pytest.raises(ValueError, match="needs a slide encoder"):
        run_align("tiny", manifest, tmp_path / "x", features=feats, overrides=FAST)
    df = pd.read_csv(manifest).drop(columns="split")
    df.to_csv(tmp_path / "nosplit.csv", index=False)
    with pytest.raises(ValueError, match="patient-level"):
        run_align("tiny", tmp_path / "nosplit.csv", tmp_path / "y", embeddings=h5, overrides=FAST)
    with pytest.raises(FileNotFoundError, match="slidefm pretrain"):
        run_align("tiny", manifest, tmp_path / "z", features=feats,
                  overrides=FAST + ["slide_encoder=/nope/encoder.pt"])  # fmt: skip


def test_align_keeps_the_best_validation_step(aligned):
    """align.pt holds the evaluation step with the highest val_same_label_mass in metrics.csv
    (the tiny config's select_metric; not necessarily the last step), and says so in
    run_config.json and the checkpoint."""
    info = json.loads((aligned / "run_config.json").read_text())
    rows = pd.read_csv(aligned / "metrics.csv").dropna(subset=["val_same_label_mass"])
    assert len(rows) == 4  # evaluations at steps 20, 40, 60, 80
    best = int(rows.loc[rows["val_same_label_mass"].idxmax(), "step"])
    sel = info["selected"]
    assert sel["step"] == best and sel["metric"] == "val_same_label_mass" and sel["restored"]
    assert sel["value"] == pytest.approx(rows["val_same_label_mass"].max())
    extra = SlideTextModel.from_checkpoint(aligned / "align.pt").checkpoint_extra
    assert extra["selected"]["step"] == best
    assert set(extra["train_case_ids"]) == set(
        pd.read_csv(cohort_manifest(aligned)).query("split == 'train'").case_id
    )


def cohort_manifest(aligned):
    return json.loads((aligned / "run_config.json").read_text())["manifest"]


def test_zero_shot_flags_other_domains_and_leaves_training_patients_out(
    aligned, cohort, tmp_path, capsys
):
    """Slides from another 'organ' (feature means never seen in alignment) are flagged out of
    domain; held-out slides of the cohort mostly are not. Without --split the training
    patients are left out of the scored rows (the leakage the checkpoint knows of)."""
    manifest, _, h5 = cohort
    ckpt = str(aligned / "align.pt")
    df = pd.read_csv(manifest)
    rng = np.random.default_rng(7)
    other = rng.normal(size=(12, 64)) * 3 + 5  # far from every subtype mean
    ood_h5 = write_embeddings(tmp_path / "ood.h5", [f"hn{i}" for i in range(12)], other,
                              {"checkpoint_sha256": "toy", "seed": 0, "encoder_config": "toy"})  # fmt: skip
    out = tmp_path / "zs_ood"
    assert main(["zero-shot", "--checkpoint", ckpt, "--embeddings", str(ood_h5), "--prompts",
                 "synthetic_subtypes", "--out", str(out), "--n-boot", "0"]) == 0  # fmt: skip
    pred = pd.read_csv(out / "predictions.csv")
    assert pred["out_of_domain"].all()
    assert json.loads((out / "metrics.json").read_text())["num_out_of_domain"] == 12
    out = tmp_path / "zs_all"
    assert main(["zero-shot", "--checkpoint", ckpt, "--embeddings", str(h5), "--prompts",
                 "synthetic_subtypes", "--manifest", str(manifest), "--label-column", "subtype",
                 "--out", str(out), "--n-boot", "20"]) == 0  # fmt: skip
    pred = pd.read_csv(out / "predictions.csv")
    assert set(pred["slide_id"]) == set(df.query("split != 'train'").slide_id)
    assert pred["out_of_domain"].mean() <= 0.25  # in domain: flagged at about alpha (0.05)
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_training_rows_dropped"] == (df.split == "train").sum()
    rc = main(["zero-shot", "--checkpoint", ckpt, "--embeddings", str(h5), "--prompts",
               "synthetic_subtypes", "--manifest", str(manifest), "--split", "train",
               "--out", str(tmp_path / "zs_train")])  # fmt: skip
    assert rc == 2 and "trained on" in capsys.readouterr().err


def test_retrieve_without_split_scores_held_out_patients_and_skips_empty_tasks(
    aligned, cohort, tmp_path, capsys
):
    manifest, _, h5 = cohort
    ckpt = str(aligned / "align.pt")
    df = pd.read_csv(manifest)
    out = tmp_path / "ret"
    assert main(["retrieve", "--checkpoint", ckpt, "--embeddings", str(h5), "--manifest",
                 str(manifest), "--label-column", "subtype", "--out", str(out),
                 "--n-boot", "20"]) == 0  # fmt: skip
    info = json.loads((out / "metrics.json").read_text())
    assert info["num_slides"] == (df.split != "train").sum()
    assert info["num_training_rows_dropped"] == (df.split == "train").sum()
    s2r = info["metrics"]["slide2report"]
    n_cases = df.query("split != 'train'").case_id.nunique()  # 16 candidates: K=10 is kept
    assert s2r["recall@1"]["chance"] == pytest.approx(1 / n_cases)
    assert "chance" in capsys.readouterr().out
    # one patient per subtype: slide2slide has no query with a relevant slide of another
    # patient, so it is skipped with a reason instead of nan + numpy warnings
    one = df[df.split == "test"].groupby("subtype").head(1)
    small = tmp_path / "one_per_subtype.csv"
    one.to_csv(small, index=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["retrieve", "--checkpoint", ckpt, "--embeddings", str(h5), "--manifest",
                     str(small), "--label-column", "subtype", "--out", str(tmp_path / "r1"),
                     "--n-boot", "20"]) == 0  # fmt: skip
    m = json.loads((tmp_path / "r1" / "metrics.json").read_text())["metrics"]
    assert (
        m["slide2slide"]["num_queries"]["value"] == 0 and m["slide2slide"]["num_queries"]["skipped"]
    )
    # 4 candidates: Recall@5/@10 are trivially 1, so they are omitted, not printed
    assert (
        "recall@5" not in m["slide2report"]
        and "recall@5" in m["slide2report"]["omitted"]["metrics"]
    )


def test_val_same_label_mass_formula():
    """Mean over slides of the softmax mass on same-label reports, against a hand loop."""
    from slidefm.train.align import val_metrics

    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3)).astype(np.float32)
    rep = rng.normal(size=(5, 3)).astype(np.float32)

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))
            self.scale = torch.tensor(2.0)

        def encode_slide(self, embeddings):
            return torch.nn.functional.normalize(embeddings.float(), dim=-1)

        def embed_texts(self, reports):
            return torch.nn.functional.normalize(torch.tensor(rep[: len(reports)]), dim=-1)

    labels = ["a", "b", "a", "c", "b"]
    got = val_metrics(Stub(), z, ["r"] * 5, ks=(1,), labels=labels)["val_same_label_mass"]
    zs = z / np.linalg.norm(z, axis=1, keepdims=True)
    zt = rep / np.linalg.norm(rep, axis=1, keepdims=True)
    want = []
    for i in range(5):
        e = np.exp(2.0 * zs[i] @ zt.T)
        p = e / e.sum()
        want.append(sum(p[j] for j in range(5) if labels[j] == labels[i]))
    assert got == pytest.approx(np.mean(want), rel=1e-5)
