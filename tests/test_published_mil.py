"""``mil train --model slide_encoder --slide-encoder <published>``: Prov-GigaPath / TITAN / CHIEF
as the frozen (or fine-tuned) encoder of a MIL head, fed each tile's absolute level-0 coords."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from slidefm.cli import main
from slidefm.io.features import SlideFeatures, grid_from_coords, read_features, write_features
from slidefm.models import create_slide_encoder
from tests.test_published_encoders import _encoder, _load, _state_from_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _cohort(root, dim: int, encoder: str, n_patients: int = 12, offset: int = 40_000):
    """One slide per patient, tiles on a 256-px lattice far from the origin (absolute and
    relative positions differ); positive slides have a shifted feature direction."""
    rng = np.random.default_rng(0)
    feats_dir, rows = root / "features", []
    direction = rng.normal(size=dim).astype(np.float32)
    for p in range(n_patients):
        n, label = int(rng.integers(10, 25)), p % 2
        cells = rng.choice(64, n, replace=False)
        coords = np.stack([cells % 8, cells // 8], 1).astype(np.int64) * 256 + offset
        x = rng.normal(size=(n, dim)).astype(np.float32) + 2.0 * label * direction
        attrs = {"encoder": encoder, "encoder_weights": "test", "target_mpp": 0.5,
                 "patch_size": 256, "patch_size_level0": 256, "config_hash": "t", "seed": 0}  # fmt: skip
        sf = SlideFeatures(f"S{p:02d}", x, coords, grid_from_coords(coords, 256),
                           np.ones(n, np.float32), attrs)  # fmt: skip
        write_features(feats_dir / f"S{p:02d}.h5", sf)
        rows.append({"slide_id": f"S{p:02d}", "case_id": f"P{p:02d}", "marker": "np"[label]})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, feats_dir


def _train(manifest, feats, out, *extra) -> int:
    argv = ["mil", "train", "--manifest", str(manifest), "--features", str(feats), "--label"]
    argv += ["marker", "--out", str(out), "--model", "slide_encoder", "--folds", "2"]
    argv += ["--no-progress", "--set", "n_boot=50", "--set", "head_epochs=5"]
    return main([*argv, *extra])


def test_mil_on_a_published_encoder_with_published_weights(tmp_path, capsys) -> None:
    manifest, feats = _cohort(tmp_path, 768, "ctranspath")
    sd = _state_from_shapes("chief")
    weights = tmp_path / "CHIEF_pretraining.pth"
    torch.save(sd, weights)
    out = tmp_path / "run"
    args = ["--slide-encoder", "chief", "--slide-encoder-weights", str(weights)]
    assert _train(manifest, feats, out, *args) == 0
    res = json.loads((out / "results.json").read_text())
    assert not any("RANDOMLY" in n for n in res["notes"])
    # The fold checkpoint is self-contained: its encoder is CHIEF with the published weights.
    from slidefm.models.mil import load_mil_checkpoint

    model, meta = load_mil_checkpoint(out / "seed0" / "fold0" / "model.pt")
    assert meta["slide_encoder"]["config"]["published"] == "chief"
    ref = create_slide_encoder("chief", weights=sd)
    sf = read_features(feats / "S03.h5")
    x, xy = torch.from_numpy(sf.features)[None], torch.from_numpy(sf.coords)[None]
    with torch.no_grad():
        got = model.encoder(x, None, None, coords=xy, patch_size_level0=256.0)
    assert float((got - ref.embed(x, xy, 256.0)).abs().max()) < 1e-5
    pred = tmp_path / "pred.csv"
    argv = ["mil", "predict", "--checkpoint", str(out / "seed0" / "fold0" / "model.pt")]
    argv += ["--manifest", str(manifest), "--features", str(feats), "--out", str(pred)]
    assert main([*argv, "--no-progress"]) == 0
    probs = pd.read_csv(pred)["prob_p"]
    assert len(probs) == 12 and probs.between(0, 1).all() and probs.nunique() > 1
    # Features of another tile encoder are refused before anything is read or trained.
    bad_manifest, bad = _cohort(tmp_path / "bad", 768, "uni")
    capsys.readouterr()
    assert _train(bad_manifest, bad, tmp_path / "bad_run", *args) != 0
    err = capsys.readouterr().err
    assert "tile encoder 'uni'" in err and "ctranspath" in err
    assert not (tmp_path / "bad_run" / "results.json").exists()


def test_frozen_embeddings_use_absolute_coords(tmp_path) -> None:
    """GigaPath positions are absolute 256-px cells: the MIL embedding cache must equal the
    published code's output (fixture-checked ``embed``) on the file's own coords."""
    from slidefm.eval.inference import frozen_embeddings
    from slidefm.io.bags import list_feature_files, load_bags
    from slidefm.models.mil import SlideEncoderMIL
    from slidefm.models.published.bag import PublishedBagEncoder

    fx = _load("gigapath.pt")
    enc = _encoder(fx)
    _, feats = _cohort(tmp_path, fx["arch"]["input_dim"], "gigapath", n_patients=3)
    bags = load_bags(list_feature_files(feats), progress=False)
    model = SlideEncoderMIL(PublishedBagEncoder(enc), fx["arch"]["input_dim"], 2)
    z = frozen_embeddings(model, bags, "k", batch_size=2, device=torch.device("cpu"))
    for j, path in enumerate(bags.paths):
        sf = read_features(path)
        x, xy = torch.from_numpy(sf.features)[None], torch.from_numpy(sf.coords)[None]
        want = enc.embed(x, xy, 256.0)[0]
        assert float((torch.from_numpy(z[j]) - want).abs().max()) < 1e-4
        shifted = enc.embed(x, xy - 40_000, 256.0)[0]  # what a relative grid would give
        assert float((shifted - want).abs().max()) > 1e-3
