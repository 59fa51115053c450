"""A run folder belongs to one (config, input set, seed) (issue 17): ``pretrain``, ``align`` and
``mil train`` refuse another one unless ``--overwrite``, never resume or reuse it silently and
never rewrite run_config.json / checkpoints to describe data the weights never saw; a truncated
latest checkpoint is named and the previous one is used."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from bag_utils import write_random_bags
from test_align_pipeline import toy_cohort
from train_utils import fast_train, set_args

from slidefm.cli import main
from slidefm.models.slide_encoder import SlideEncoder
from slidefm.train.align import run_align
from slidefm.train.pretrain import run_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [*fast_train(2), "data.holdout_fraction=0"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_cohorts(tmp_path_factory):
    """Same slide ids, different feature values."""
    a, b = tmp_path_factory.mktemp("fa"), tmp_path_factory.mktemp("fb")
    ids = write_random_bags(a, num=6, dim=16, n_range=(20, 30), side=8, seed=0, smooth=True)
    write_random_bags(b, num=6, dim=16, n_range=(20, 30), side=8, seed=1, smooth=True)
    return a, b, ids


def test_pretrain_refuses_other_features_or_seed_and_keeps_the_record(two_cohorts, tmp_path):
    a, b, _ = two_cohorts
    out = tmp_path / "run"
    run_pretrain("tiny", a, out, FAST, seed=0)
    record, enc = sha(out / "run_config.json"), sha(out / "encoder.pt")
    for feats, seed, what in ((b, 0, "input set"), (a, 5, "seed")):
        with pytest.raises(ValueError, match=f"another {what}.*--overwrite"):
            run_pretrain("tiny", feats, out, FAST, seed=seed)
        assert sha(out / "run_config.json") == record and sha(out / "encoder.pt") == enc
    rc = main(["pretrain", "--config", "tiny", "--features", str(b), "--out", str(out)]
              + set_args(FAST))  # fmt: skip
    assert rc == 2  # the CLI says it in one line too
    # the same run again is fine (reuse), and so is a copy of the same features elsewhere
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    info = run_pretrain("tiny", copy, out, FAST, seed=0)
    assert info["steps"] == 6 and sha(out / "encoder.pt") == enc


def test_killed_pretrain_is_not_resumed_on_other_features(two_cohorts, tmp_path):
    a, b, _ = two_cohorts
    out = tmp_path / "run"
    run_pretrain("tiny", a, out, FAST, seed=0, stop_at_step=4)  # checkpoint at step 3
    ckpts = sorted((out / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="another input set"):
        run_pretrain("tiny", b, out, FAST, seed=0)
    assert sorted((out / "checkpoints").iterdir()) == ckpts
    assert json.loads((out / "run_config.json").read_text())["features"] == str(a.resolve())
    # --overwrite discards the old run: a fresh run on b equals a run on b in a new folder
    fresh = run_pretrain("tiny", b, tmp_path / "fresh", FAST, seed=0)
    over = run_pretrain("tiny", b, out, FAST, seed=0, overwrite=True)
    assert over["identity"] == fresh["identity"]
    x = SlideEncoder.from_checkpoint(out / "encoder.pt").state_dict()
    y = SlideEncoder.from_checkpoint(tmp_path / "fresh" / "encoder.pt").state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_outputs_without_a_record_are_refused(two_cohorts, tmp_path):
    a, _, _ = two_cohorts
    out = tmp_path / "run"
    run_pretrain("tiny", a, out, FAST, seed=0, stop_at_step=4)
    (out / "run_config.json").unlink()  # e.g. a folder of another tool or an older slidefm
    with pytest.raises(ValueError, match="unidentified run"):
        run_pretrain("tiny", a, out, FAST, seed=0)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(two_cohorts, tmp_path, caplog):
    a, _, _ = two_cohorts
    over = [*FAST, "train.max_steps=9"]
    run_pretrain("tiny", a, tmp_path / "straight", over, seed=0)
    out = tmp_path / "run"
    run_pretrain("tiny", a, out, over, seed=0, stop_at_step=7)  # checkpoints at 3 and 6
    last = out / "checkpoints" / "step_00000006.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        info = run_pretrain("tiny", a, out, over, seed=0)
    assert info["steps"] == 9
    assert any("step_00000006.pt" in r.getMessage() and "falling back" in r.getMessage()
               and "step_00000003.pt" in r.getMessage() for r in caplog.records)  # fmt: skip
    # resuming from step 3 replays steps 4..9 exactly: same weights as the straight run
    x = SlideEncoder.from_checkpoint(out / "encoder.pt").state_dict()
    y = SlideEncoder.from_checkpoint(tmp_path / "straight" / "encoder.pt").state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_truncated_only_checkpoint_is_named(two_cohorts, tmp_path):
    a, _, _ = two_cohorts
    out = tmp_path / "run"
    run_pretrain("tiny", a, out, FAST, seed=0, stop_at_step=4)
    (ck,) = (out / "checkpoints").iterdir()
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"step_00000003\.pt: not a readable training checkpoint"):
        run_pretrain("tiny", a, out, FAST, seed=0)


def test_align_refuses_other_reports_or_seed(tmp_path):
    manifest, _, h5 = toy_cohort(tmp_path, n_cases=12)
    out = tmp_path / "al"
    kw = dict(embeddings=h5, overrides=fast_train(4) + ["data.tokenizer_vocab_size=300"])
    run_align("tiny", manifest, out, seed=0, stop_at_step=4, **kw)
    record, tok = sha(out / "run_config.json"), sha(out / "tokenizer.model")
    with pytest.raises(ValueError, match="another seed"):
        run_align("tiny", manifest, out, seed=3, **kw)
    df = pd.read_csv(manifest)
    df.loc[0, "report"] = "Final diagnosis: something else entirely."
    other = tmp_path / "other.csv"
    df.to_csv(other, index=False)
    with pytest.raises(ValueError, match="another input set"):
        run_align("tiny", other, out, seed=0, **kw)
    assert sha(out / "run_config.json") == record and sha(out / "tokenizer.model") == tok
    info = run_align("tiny", manifest, out, seed=0, **kw)  # the same run resumes
    assert info["steps"] == 6
    old = json.loads((out / "run_config.json").read_text())
    info = run_align("tiny", other, out, seed=0, overwrite=True, **kw)
    new = json.loads((out / "run_config.json").read_text())
    assert new["manifest"] == str(other.resolve()) and new["identity"] != old["identity"]
    assert info["steps"] == 6 and new["identity"] == info["identity"]


def _mil(manifest, feats, out, *extra):
    args = ["mil", "train", "--manifest", str(manifest), "--features", str(feats), "--label", "y"]
    args += ["--folds", "2", "--epochs", "1", "--out", str(out), "--no-progress", *extra]
    return main(args + ["--set", "n_boot=10", "--set", "patience=1"])


def test_mil_train_refuses_other_features(two_cohorts, tmp_path, capsys):
    a, b, ids = two_cohorts
    m = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ids, "case_id": ids, "y": [0, 1] * 3}).to_csv(m, index=False)
    out = tmp_path / "mil"
    assert _mil(m, a, out) == 0
    preds = sha(out / "predictions.csv")
    capsys.readouterr()
    assert _mil(m, b, out) == 2  # before: the folds trained on a were silently reused
    assert "another input set" in capsys.readouterr().err
    assert sha(out / "predictions.csv") == preds
    assert _mil(m, a, out) == 0 and sha(out / "predictions.csv") == preds  # same run: reuse
    assert _mil(m, b, out, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert _mil(m, b, fresh) == 0
    pa = pd.read_csv(out / "predictions.csv")
    pb = pd.read_csv(fresh / "predictions.csv")
    np.testing.assert_allclose(pa["prob_1"], pb["prob_1"], rtol=1e-6)
