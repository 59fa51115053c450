"""Continued pretraining of a published slide encoder (``slidefm pretrain`` with
``encoder=gigapath|titan``): per-tile tokens, the input-space mask token, the published layout
written back, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slidefm.cli import main
from slidefm.io.atomic import TMP_MARK
from slidefm.models import create_slide_encoder
from slidefm.models.published.bag import PublishedBagEncoder
from slidefm.models.registry import PUBLISHED, read_weights, save_published_weights
from tests.test_published_encoders import _encoder, _load, _state_from_shapes
from tests.test_published_mil import _cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["gigapath", "titan", "chief"])
def test_weights_written_back_in_the_published_layout(tmp_path, name) -> None:
    """Keys, shapes and values of the file equal the published state dict it was loaded
    from (the reference fixtures' own layout), minus what the loader drops on purpose."""
    fx = _load(f"{name}.pt")
    enc = _encoder(fx)
    path = save_published_weights(enc, tmp_path / PUBLISHED[name].export_file)
    got = read_weights(path)
    if name == "gigapath":
        assert set(got) == {"model"}
        got = got["model"]
    ref = {k: v for k, v in fx["state_dict"].items() if not k.startswith(("text_encoder.",))}
    ref.pop("pos_embed", None)  # GigaPath's sin-cos table: recomputed, never stored
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v.to(got[k].dtype)), k
    assert not list(tmp_path.glob(f".*{TMP_MARK}*"))  # written under a temporary name, renamed


def _titan_slide(n: int = 40, seed: int = 0):
    """Patches on a 512-px lattice in shuffled order, three pairs sharing a cell."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(100, n, replace=False)
    cells[-3:] = cells[:3]  # collisions
    coords = np.stack([cells % 10, cells // 10], 1) * 512 + 1000
    coords[-3:] += 100  # same cell, other offset inside it
    feats = torch.from_numpy(rng.normal(size=(n, 32)).astype(np.float32))
    return feats, torch.from_numpy(coords.astype(np.int64))


def test_titan_tile_tokens_are_their_cells_tokens() -> None:
    enc = create_slide_encoder(
        "titan", weights="random", input_dim=32, embed_dim=32, depth=2, num_heads=4,
        pool_heads=4, pool_queries=4,
    )  # fmt: skip
    feats, coords = _titan_slide()
    with torch.no_grad():
        prefix, tiles = enc.tile_tokens(feats, coords, 512.0)
        tokens = enc.forward_tokens(feats, coords, 512.0)
    assert tiles.shape == (1, len(feats), 32) and torch.equal(prefix, tokens[:, :1])
    # Independent cell order: x-major over the cells present (floor of the offset from min).
    cell = ((coords - coords.min(0).values) // 512).tolist()
    order = sorted({tuple(c) for c in cell})
    for i, c in enumerate(cell):
        assert torch.equal(tiles[0, i], tokens[0, 1 + order.index(tuple(c))])
    assert torch.equal(tiles[0, 0], tiles[0, -3])  # the pair sharing a cell shares its token


@pytest.mark.parametrize("name", ["gigapath", "titan"])
def test_mask_token_replaces_hidden_inputs(name) -> None:
    """Masked tokens = the published forward on features with hidden rows replaced by the mask
    token (naive construction); padded rows come back zero; gradients reach both."""
    fx = _load(f"{name}.pt")
    bag = PublishedBagEncoder(_encoder(fx), mask_token=True)
    case = next(iter(fx["cases"].values()))["inputs"]
    feats, xy, ps = case["features"][:1].float(), case["coords"][:1], case["patch_size_level0"]
    n = feats.shape[1]
    hidden = torch.zeros(1, n, dtype=torch.bool)
    hidden[0, ::3] = True
    pad_feats = torch.cat([feats, torch.zeros(1, 5, feats.shape[2])], 1)
    pad_xy = torch.cat([xy, torch.zeros(1, 5, 2, dtype=xy.dtype)], 1)
    pad = torch.zeros(1, n + 5, dtype=torch.bool)
    pad[0, n:] = True
    mask = torch.cat([hidden, torch.zeros(1, 5, dtype=torch.bool)], 1)
    prefix, tiles = bag.forward_tokens(pad_feats, None, pad, mask, pad_xy, float(ps))
    naive = feats[0].clone()
    naive[hidden[0]] = bag.mask_token.detach()
    with torch.no_grad():
        ref_prefix, ref_tiles = bag.published.tile_tokens(naive, xy[0], float(ps))
    assert float((tiles[:, :n].detach() - ref_tiles).abs().max()) < 1e-5
    assert float((prefix.detach() - ref_prefix).abs().max()) < 1e-5
    assert torch.equal(tiles[:, n:], torch.zeros_like(tiles[:, n:]))
    tiles[:, :n].sum().backward()
    assert bag.mask_token.grad is not None and float(bag.mask_token.grad.abs().sum()) > 0


def test_chief_has_no_tokens_to_pretrain() -> None:
    bag = PublishedBagEncoder(create_slide_encoder("chief", weights="random"), mask_token=True)
    with pytest.raises(ValueError, match="no token per tile"):
        bag.forward_tokens(torch.randn(1, 4, 768), None, None, None, torch.zeros(1, 4, 2), 256.0)


@pytest.mark.slow
def test_pretrain_continues_from_published_titan_weights(tmp_path, capsys) -> None:
    """The full-size TITAN layout in, trained a few steps on one's own cohort, the same layout
    out: ``create_slide_encoder('titan', weights=<out file>)`` loads it strictly and differs
    from the start; features of another tile encoder are refused."""
    _, feats = _cohort(tmp_path, 768, "conch_v15", n_patients=8)
    sd = _state_from_shapes("titan")
    start = tmp_path / "titan_start.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(start))
    out = tmp_path / "pre"
    argv = ["pretrain", "--features", str(feats), "--out", str(out), "--config", "tiny"]
    sets = ["encoder=titan", f"encoder_weights={start}", "match_input_dim=false",
            "train.max_steps=3", "train.eval_every=3", "train.ckpt_every=3",
            "data.batch_size=2", "data.crop=null", "data.min_holdout=2"]  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "slidefm embed-slides --model titan --weights" in printed
    info = json.loads((out / "run_config.json").read_text())
    assert info["init_weights"] == str(start)
    done = create_slide_encoder("titan", weights=out / "model.safetensors")
    before = create_slide_encoder("titan", weights=sd)
    moved = [k for k, v in done.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any(k.startswith("blocks.") for k in moved) and "patch_embed.0.weight" in moved
    # Wrong tile encoder: refused before training.
    _, bad = _cohort(tmp_path / "bad", 768, "uni", n_patients=6)
    argv_bad = [*argv]
    argv_bad[argv_bad.index(str(feats))] = str(bad)
    argv_bad[argv_bad.index(str(out))] = str(tmp_path / "bad_out")
    capsys.readouterr()
    assert main(argv_bad) != 0
    assert "tile encoder 'uni'" in capsys.readouterr().err
    assert not (tmp_path / "bad_out" / "model.safetensors").exists()


def test_pretrain_config_checks_published_options() -> None:
    from slidefm.config import ConfigError
    from slidefm.train.pretrain import PretrainRunConfig

    with pytest.raises(ConfigError, match="encoder_weights"):
        PretrainRunConfig(encoder="gigapath")
    with pytest.raises(ConfigError, match="gigapath architecture option"):
        PretrainRunConfig(encoder="gigapath", encoder_weights="random",
                          encoder_overrides={"d_model": 8})  # fmt: skip
    with pytest.raises(ConfigError, match="only published encoders"):
        PretrainRunConfig(encoder="tiny", encoder_weights="hub")
    ok = PretrainRunConfig(encoder="gigapath", encoder_weights="hub",
                           encoder_overrides={"depth": 2})  # fmt: skip
    assert ok.published


@pytest.mark.slow
def test_align_on_a_published_encoder(tmp_path) -> None:
    """``align --slide-encoder chief --slide-encoder-weights PATH``: frozen, align.pt's slide
    encoder is the published model with the file's weights (checked against ``embed``, the
    fixture-checked published forward, on each slide's own coords); fine-tuned (``full``),
    the weights move and align.pt rebuilds the published architecture."""
    from slidefm.eval.embed import slide_embeddings
    from slidefm.io.features import read_features
    from slidefm.models.clip import SlideTextModel
    from tests.test_align_pipeline import FAST, toy_cohort
    from tests.train_utils import set_args

    manifest, feats, _ = toy_cohort(tmp_path, n_cases=12, dim=768, encoder="ctranspath")
    sd = _state_from_shapes("chief")
    weights = tmp_path / "CHIEF_pretraining.pth"
    torch.save(sd, weights)
    ref = create_slide_encoder("chief", weights=sd)
    sid = "case005_s0"
    sf = read_features(feats / f"{sid}.h5")
    want = ref.embed(torch.from_numpy(sf.features)[None], torch.from_numpy(sf.coords)[None], 256.0)
    for mode in ("frozen", "full"):
        out = tmp_path / mode
        argv = ["align", "--config", "tiny", "--features", str(feats), "--manifest", str(manifest)]
        argv += ["--out", str(out), "--slide-encoder", "chief"]
        argv += ["--slide-encoder-weights", str(weights)]
        argv += set_args([*FAST, f"model.slide_trainable={mode}", "data.batch_size=4"])
        assert main(argv) == 0
        model = SlideTextModel.from_checkpoint(out / "align.pt")
        assert isinstance(model.slide_encoder, PublishedBagEncoder)
        got = torch.from_numpy(slide_embeddings(model, [sid], features=feats))
        gap = float((got - want).abs().max())
        assert (gap < 1e-5) if mode == "frozen" else (gap > 1e-4), (mode, gap)
        info = json.loads((out / "run_config.json").read_text())
        assert info["slide_encoder"] == "chief" and info["slide_encoder_weights"] == "pretrained"
