"""One test per model registry, parametrised from the registry itself: every entry is built with
random weights and its output has the documented shape (a new entry is tested automatically,
as in timm's registry-driven tests).

Tile encoders: ``tests/test_random_weights.py::test_every_entry_random_init_is_input_dependent``
builds every ``list_encoders()`` entry with random weights (depth cut to 2 blocks) and checks
[B, embed_dim]; it is not repeated here. Slide encoders, MIL heads and text towers are below.
Large entries keep their widths and lose blocks (``depth=1``): the output width is the entry's.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from slidefm.encoders.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    create_text_tower,
    list_text_towers,
    text_tower_config,
    train_tokenizer,
)
from slidefm.models import MIL_MODELS
from slidefm.models.mil import create_mil_head, get_mil_head, list_mil_heads
from slidefm.models.registry import (
    create_slide_encoder,
    get_entry,
    is_published,
    list_slide_encoders,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bag(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, n, dim, generator=g)
    cells = torch.randperm(36, generator=g)[:n]
    grid = torch.stack([cells % 6, cells // 6], -1).unsqueeze(0)  # distinct (col, row) cells
    return feats, grid


# ------------------------------------------------------------------------------ slide encoders
def _fewer_blocks(name: str) -> dict[str, int]:
    e = get_entry(name)
    takes_depth = e.kind == "slidefm" or "depth" in inspect.signature(e.build).parameters
    return {"depth": 1} if takes_depth else {}


@pytest.mark.parametrize("name", list_slide_encoders())
def test_every_slide_encoder_entry_builds_random_and_gives_its_output_dim(name):
    entry = get_entry(name)
    torch.manual_seed(0)
    enc = create_slide_encoder(name, weights="random", **_fewer_blocks(name))
    assert enc.weights_id == "random" and not enc.training
    outs = []
    for seed in (1, 2):
        feats, grid = _bag(12, entry.input_dim, seed)
        with torch.no_grad():
            if is_published(enc):  # level-0 px corners of 256-px tiles
                outs.append(enc.embed(feats, grid * 256.0, 256.0))
            else:
                outs.append(enc(feats, grid))
    for out in outs:
        assert out.shape == (1, entry.output_dim)
        assert torch.isfinite(out).all()
    assert not torch.allclose(outs[0], outs[1])  # random weights, yet input-dependent


# ----------------------------------------------------------------------------------- MIL heads
def test_mil_head_names_for_cli_help_match_the_registry():
    assert tuple(list_mil_heads()) == MIL_MODELS


@pytest.mark.parametrize("name", list_mil_heads())
def test_every_mil_head_builds_random_gives_logits_and_ignores_padding(name):
    dim, classes, n, pad = 16, 3, 10, 4
    entry = get_mil_head(name)
    torch.manual_seed(0)
    encoder = create_slide_encoder("tiny", input_dim=dim) if entry.needs_encoder else None
    model = create_mil_head(name, dim, classes, encoder=encoder).eval()
    f1, g1 = _bag(n, dim, 1)
    f2, g2 = _bag(n, dim, 2)
    feats, grid = torch.cat([f1, f2]), torch.cat([g1, g2])
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n - pad :] = True
    with torch.no_grad():
        out = model(feats, grid, mask)
        alone = model(f2[:, : n - pad], g2[:, : n - pad], None)
    assert out["logits"].shape == (2, classes)
    torch.testing.assert_close(out["logits"][1:], alone["logits"], atol=1e-5, rtol=1e-5)
    if entry.attention:
        a = out["attention"]
        assert a.shape == (2, n) and torch.all(a[1, n - pad :] == 0)
        torch.testing.assert_close(a.sum(1), torch.ones(2))


def test_unknown_mil_option_names_the_known_ones():
    with pytest.raises(ValueError, match="no option.*bogus.*its options: hidden, attn_dim"):
        create_mil_head("abmil", 8, 2, bogus=1)
    with pytest.raises(ValueError, match="Unknown MIL model 'nope'; choose one of mean"):
        create_mil_head("nope", 8, 2)


# --------------------------------------------------------------------------------- text towers
TINY_TEXT = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "context_length": 12}


def _ids(vocab: int, length: int) -> torch.Tensor:
    ids = torch.full((2, length), PAD_ID)
    g = torch.Generator().manual_seed(0)
    for row, n in enumerate((length - 2, 3)):  # a full row and a short one
        ids[row, 0], ids[row, n + 1] = BOS_ID, EOS_ID
        ids[row, 1 : n + 1] = torch.randint(4, vocab, (n,), generator=g)
    return ids


@pytest.mark.parametrize("name", list_text_towers())
def test_every_text_tower_builds_random_and_gives_its_output_dim(name, tiny_open_clip):
    torch.manual_seed(0)
    if text_tower_config(name).kind == "open_clip":
        tower = create_text_tower(name, weights="random", model_name=tiny_open_clip)
        ids, want = tower.tokenizer(["small cell carcinoma", "benign lung"]), 16
    else:
        tower = create_text_tower(name, weights="random", vocab_size=300, **TINY_TEXT)
        ids, want = _ids(300, TINY_TEXT["context_length"]), TINY_TEXT["output_dim"]
    assert tower.weights_id == "random" and not tower.training
    with torch.no_grad():
        out = tower(ids)
    assert out.shape == (2, want) and tower.output_dim == want
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def test_text_tower_from_an_alignment_checkpoint_is_its_text_tower(shared_data, tmp_path):
    import pandas as pd

    from slidefm.models.clip import AlignModelConfig, SlideTextModel

    texts = pd.read_csv(shared_data / "reports" / "tcga_reports_val.csv")["text"][:30].tolist()
    tok = train_tokenizer(texts, 400, tmp_path / "tok.model")
    torch.manual_seed(0)
    text = {**TINY_TEXT, "pool": "mean"}
    model = SlideTextModel(AlignModelConfig(embed_dim=16, text=text), 8, tok).eval()
    model.save_checkpoint(tmp_path / "align.pt")
    tower = create_text_tower("sentencepiece_mean", weights=tmp_path / "align.pt")
    ids = tower.tokenizer(texts[:3])
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), model.text_tower(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="fixes pool"):  # the checkpoint's tower is the mean one
        create_text_tower("sentencepiece", weights=tmp_path / "align.pt")


# --------------------------------------------------- one grammar: NAME + --weights random | PATH
def test_random_weights_have_one_spelling_and_the_old_ones_warn(tmp_path, caplog):
    import hashlib
    import logging

    from slidefm.models.registry import slide_encoder_from_spec

    x, grid = _bag(10, 16, 3)

    def embed(spec, weights=None):
        torch.manual_seed(5)
        enc, info = slide_encoder_from_spec(spec, weights, input_dim=16)
        with torch.no_grad():
            return enc.eval()(x, grid), info

    caplog.set_level(logging.WARNING)
    new, info = embed("tiny", "random")
    assert info == {"slide_encoder": "tiny", "slide_encoder_weights": "random",
                    "slide_encoder_sha256": "random"}  # fmt: skip
    assert "DEPRECATED" not in caplog.text
    for old in ("random:tiny", "tiny"):  # align's and mil's spellings before the registry
        caplog.clear()
        got, info = embed(old)
        assert info["slide_encoder_weights"] == "random"
        torch.testing.assert_close(got, new, atol=0, rtol=0)  # same seed, same encoder
        assert "DEPRECATED" in caplog.text and "'tiny' with --weights random" in caplog.text
    torch.manual_seed(5)
    enc = slide_encoder_from_spec("tiny", "random", 16)[0]
    enc.save_checkpoint(tmp_path / "enc.pt")
    _, info = slide_encoder_from_spec(str(tmp_path / "enc.pt"), input_dim=16)
    want = hashlib.sha256((tmp_path / "enc.pt").read_bytes()).hexdigest()
    assert info["slide_encoder_weights"] == "pretrained" and info["slide_encoder_sha256"] == want
    with pytest.raises(ValueError, match="takes 16-d tile features but these are 8-d"):
        slide_encoder_from_spec(str(tmp_path / "enc.pt"), input_dim=8)
    with pytest.raises(ValueError, match="is a checkpoint"):
        slide_encoder_from_spec(str(tmp_path / "enc.pt"), "random")
    with pytest.raises(ValueError, match="needs --weights hub.*or --weights random"):
        slide_encoder_from_spec("gigapath")
    with pytest.raises(ValueError, match="unknown slide encoder 'nope'"):
        slide_encoder_from_spec("nope", "random")
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        slide_encoder_from_spec(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    ("command", "names"), [("mil-heads", list_mil_heads), ("text-towers", list_text_towers)]
)
def test_list_commands_print_one_row_per_entry(command, names, capsys):
    from slidefm.cli import main

    assert main([command, "list", "--details"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].startswith("name ") and set(table[1]) <= {"-", " "}
    assert [row.split()[0] for row in table[2:]] == names()
    assert all(f"{n}: " in out for n in names())  # --details: one description line each
