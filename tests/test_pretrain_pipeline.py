"""``slidefm pretrain`` and ``slidefm embed-slides`` end to end on tiny random cohorts."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from bag_utils import write_random_bags
from train_utils import fast_train, set_args

from slidefm.cli import main
from slidefm.io.embeddings import read_embeddings
from slidefm.io.features import read_features
from slidefm.models.slide_encoder import SlideEncoder
from slidefm.train.pretrain import run_pretrain

FAST = fast_train(batch_size=2)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("feats")
    ids = write_random_bags(d, num=12, dim=16, n_range=(30, 60), side=10, smooth=True)
    return d, ids


@pytest.fixture(scope="module")
def pretrained(cohort, tmp_path_factory):
    feats, _ = cohort
    out = tmp_path_factory.mktemp("pre")
    args = ["pretrain", "--config", "tiny", "--features", str(feats), "--out", str(out)]
    rc = main(args + set_args(FAST) + ["--seed", "3"])
    assert rc == 0
    return out


def test_pretrain_outputs(pretrained, cohort):
    out = pretrained
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    rk = [float(r["rankme"]) for r in rows if r.get("rankme")]
    assert len(rk) == 2  # eval every 3 steps
    info = json.loads((out / "run_config.json").read_text())
    n_hold = len(info["holdout_slides"])
    assert n_hold == 4 and info["num_train_slides"] == 8 and info["rankme_on"] == "holdout"
    assert all(1.0 <= r <= n_hold + 1e-6 for r in rk)  # effective rank of 4 embeddings
    assert info["seed"] == 3 and len(info["config_hash"]) == 16 and info["steps"] == 6
    # the toy features say their tile encoder was random: the run (and encoder.pt) says so
    assert info["tile_encoder_weights"] == "random"
    meta = SlideEncoder.from_checkpoint(out / "encoder.pt")._read_checkpoint(out / "encoder.pt")
    assert meta["extra"]["tile_encoder_weights"] == "random"
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000003.pt",
        "step_00000006.pt",
    ]
    enc = SlideEncoder.from_checkpoint(out / "encoder.pt")
    assert enc.config.input_dim == 16
    # The saved encoder is the trained one: it equals the model inside the last checkpoint.
    state = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True)["model"]
    for k, v in enc.state_dict().items():
        assert torch.equal(state[f"encoder.{k}"], v), k
    # Input standardisation = per-dimension mean/std of the training slides' tiles (NumPy).
    hold = set(info["holdout_slides"])
    tiles = np.concatenate(
        [read_features(p).features for p in sorted(cohort[0].glob("*.h5")) if p.stem not in hold]
    ).astype(np.float64)
    np.testing.assert_allclose(enc.input_mean.numpy(), tiles.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc.input_std.numpy(), tiles.std(0), rtol=1e-4)


def test_pipeline_resume_is_exact(cohort, tmp_path):
    feats, _ = cohort
    straight = run_pretrain("tiny", feats, tmp_path / "a", FAST, seed=1)
    run_pretrain("tiny", feats, tmp_path / "b", FAST, seed=1, stop_at_step=4)
    assert not (tmp_path / "b" / "encoder.pt").exists()  # stopped runs write no encoder
    resumed = run_pretrain("tiny", feats, tmp_path / "b", FAST, seed=1)
    assert straight["config_hash"] == resumed["config_hash"]
    a = SlideEncoder.from_checkpoint(tmp_path / "a" / "encoder.pt").state_dict()
    b = SlideEncoder.from_checkpoint(tmp_path / "b" / "encoder.pt").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="another config"):
        run_pretrain("tiny", feats, tmp_path / "b", FAST + ["objective.mask_ratio=0.3"], seed=1)


def test_manifest_restricts_to_train_split(cohort, tmp_path):
    feats, ids = cohort
    split = ["train"] * 10 + ["test"] * 2
    pd.DataFrame({"slide_id": ids, "split": split}).to_csv(tmp_path / "m.csv", index=False)
    info = run_pretrain(
        "tiny",
        feats,
        tmp_path / "o",
        FAST + ["train.max_steps=1"],
        manifest=str(tmp_path / "m.csv"),
    )
    used = info["num_train_slides"] + len(info["holdout_slides"])
    assert used == 10 and not {"bag10", "bag11"} & set(info["holdout_slides"])


def test_embed_with_checkpoint(pretrained, cohort, tmp_path, capsys):
    feats, ids = cohort
    ckpt = pretrained / "encoder.pt"
    out = tmp_path / "e.h5"
    rc = main(
        ["embed-slides", "--checkpoint", str(ckpt), "--features", str(feats), "--out", str(out)]
    )
    assert rc == 0
    got_ids, emb, attrs = read_embeddings(out)
    assert got_ids == sorted(ids) and emb.shape[0] == 12
    assert attrs["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert attrs["seed"] == 0 and attrs["weights"] != "random"
    enc = SlideEncoder.from_checkpoint(ckpt).eval()
    sf = read_features(feats / "bag5.h5")
    with torch.no_grad():
        ref = enc(torch.from_numpy(sf.features)[None], torch.from_numpy(sf.grid).long()[None])
    np.testing.assert_allclose(emb[got_ids.index("bag5")], ref[0].numpy(), rtol=1e-5, atol=1e-6)
    printed = capsys.readouterr().out
    assert "slide encoder has RANDOM" not in printed  # a pretrained slide encoder ...
    assert "RANDOMLY INITIALISED" in printed  # ... on features of a random tile encoder
    assert attrs["tile_encoder_weights"] == "random"


def test_embed_random_weights_is_marked(tmp_path, capsys):
    feats = tmp_path / "f"
    write_random_bags(feats, num=3, dim=SlideEncoder.from_config("tiny").config.input_dim)
    pd.DataFrame({"slide_id": ["bag2", "bag0"]}).to_csv(tmp_path / "m.csv", index=False)
    base = ["embed-slides", "--config", "tiny", "--features", str(feats), "--out"]
    assert main(base + [str(tmp_path / "r.h5")]) == 2  # untrained needs --weights random
    assert "--weights random" in capsys.readouterr().err
    rc = main(
        base
        + [
            str(tmp_path / "r.h5"),
            "--weights",
            "random",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--seed",
            "4",
        ]
    )
    assert rc == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    ids, emb, attrs = read_embeddings(tmp_path / "r.h5")
    assert ids == ["bag2", "bag0"] and np.isfinite(emb).all()
    assert attrs["checkpoint_sha256"] == "random" and attrs["weights"] == "random"
    assert attrs["seed"] == 4 and attrs["encoder_config"] == "tiny"
