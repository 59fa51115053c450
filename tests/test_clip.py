"""Slide/text dual encoder: the loss against a hand-written InfoNCE, trainability, temperature
clamp, DDP gathering, checkpoints and the zero-shot API."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from slidefm.encoders.text import train_tokenizer
from slidefm.eval.zero_shot import PromptSet, class_embeddings, zero_shot_probs
from slidefm.models.clip import AlignModelConfig, SlideTextModel, clip_loss, set_trainable

TEXT = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "context_length": 24}


@pytest.fixture(scope="module")
def tok_path(shared_data, tmp_path_factory):
    texts = pd.read_csv(shared_data / "reports" / "tcga_reports_val.csv")["text"][:40].tolist()
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "tok.model")


def naive_infonce(s, t, scale):
    """½ (CE over rows of scale·S·Tᵀ + CE over its columns), log-softmax written out."""
    n = len(s)
    logits = [[scale * float(np.dot(s[i], t[j])) for j in range(n)] for i in range(n)]
    row = col = 0.0
    for i in range(n):
        row -= logits[i][i] - math.log(sum(math.exp(logits[i][j]) for j in range(n)))
        col -= logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(n)))
    return (row / n + col / n) / 2


def test_clip_loss_equals_hand_computed_infonce():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 8))
    t = rng.normal(size=(5, 8)) + s  # correlated pairs
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    got = clip_loss(torch.tensor(s), torch.tensor(t), torch.tensor(7.5), world_size=1, rank=0)
    assert float(got) == pytest.approx(naive_infonce(s, t, 7.5), rel=1e-9)


class Blocks(torch.nn.Module):
    """A slide-encoder stand-in with numbered blocks: mean of projected tiles."""

    def __init__(self, d_in=6, d=10, n_blocks=3):
        super().__init__()
        self.embed_dim = d
        self.proj = torch.nn.Linear(d_in, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n_blocks))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, features, grid, padding_mask=None):
        x = self.proj(features)
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        keep = (~padding_mask).float()[..., None] if padding_mask is not None else 1.0
        return self.norm((x * keep).sum(1) / (keep.sum(1) if padding_mask is not None else 1))


def bag_batch(b=4, n=7, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[0, 5:] = True
    return {
        "features": torch.randn(b, n, d, generator=g),
        "grid": torch.randint(0, 5, (b, n, 2), generator=g),
        "padding_mask": pad,
    }


@pytest.mark.parametrize(
    "mode, trainable",
    [
        ("frozen", []),
        ("partial", ["blocks.2.weight", "blocks.2.bias", "norm.weight", "norm.bias"]),
        ("full", None),
    ],
)
def test_slide_encoder_trainability(mode, trainable, tok_path):
    torch.manual_seed(0)
    enc = Blocks()
    cfg = AlignModelConfig(embed_dim=16, slide_trainable=mode, trainable_blocks=1, text=TEXT)
    model = SlideTextModel(cfg, enc.embed_dim, tok_path, slide_encoder=enc).train()
    batch = {**bag_batch(), "text": model.tokenize(["a", "b c", "small cell", "papillary"])["text"]}
    loss, metrics = model(batch)
    loss.backward()
    got = [n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    want = [n for n, _ in enc.named_parameters()] if trainable is None else trainable
    assert sorted(got) == sorted(want)
    assert model.slide_proj[1].weight.grad is not None  # heads always train
    assert enc.training == (mode != "frozen")  # a frozen encoder stays in eval mode
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_partial_needs_blocks():
    with pytest.raises(ValueError, match="numbered blocks"):
        set_trainable(torch.nn.Linear(3, 3), "partial", 1)


def test_logit_scale_clamped_like_open_clip(tok_path):
    model = SlideTextModel(AlignModelConfig(embed_dim=16, text=TEXT), 10, tok_path)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.on_optimizer_step(1, 10)
    assert float(model.scale.detach()) == pytest.approx(100.0, rel=1e-5)


def test_chunked_text_is_mean_of_chunks(tok_path):
    torch.manual_seed(0)
    text = {**TEXT, "long_text": "chunk", "context_length": 8}
    model = SlideTextModel(AlignModelConfig(embed_dim=16, text=text), 10, tok_path).eval()
    texts = ["invasive ductal carcinoma of the left breast with necrosis", "benign"]
    tok = model.tokenize(texts)
    assert (tok["text_owner"] == 0).sum() > 1
    got = model.embed_texts(texts)
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.encode_text(tok["text"]), dim=-1)
    for i in range(2):
        m = z[tok["text_owner"] == i].mean(0)
        assert torch.allclose(got[i], m / m.norm(), atol=1e-6)


def test_checkpoint_roundtrip_and_zero_shot_api(tok_path, tmp_path):
    torch.manual_seed(0)
    model = SlideTextModel(AlignModelConfig(embed_dim=16, text=TEXT), 10, tok_path).eval()
    model.save_checkpoint(tmp_path / "align.pt", extra={"seed": 3})
    back = SlideTextModel.from_checkpoint(tmp_path / "align.pt")
    emb = torch.randn(6, 10)
    texts = ["adenocarcinoma", "small cell carcinoma of lung"]
    assert torch.allclose(back.embed_texts(texts), model.embed_texts(texts))
    assert torch.allclose(back.encode_slide(embeddings=emb), model.encode_slide(embeddings=emb))
    assert back.checkpoint_extra == {"seed": 3}
    ps = PromptSet(
        classes=("a", "b"),
        synonyms={"a": ("adenocarcinoma", "glands"), "b": ("small cell carcinoma",)},
        templates=("an H&E image of {}.", "{} tissue."),
    )
    probs = back.zero_shot(emb, ps)
    with torch.no_grad():
        ref = zero_shot_probs(
            back.encode_slide(embeddings=emb), class_embeddings(back.embed_texts, ps), back.scale
        )
    assert probs.shape == (6, 2) and torch.allclose(probs, ref)
    with pytest.raises(ValueError, match="expects 10-d"):
        back.encode_slide(embeddings=torch.randn(2, 7))
    with pytest.raises(ValueError, match="precomputed slide embeddings"):
        back.encode_slide(**bag_batch())


# -- DDP: gathered negatives give the single-process loss and gradient ----------------------
def _ddp_worker(rank, world, port, s, t, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = len(s) // world
    ls = s[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    lt = t[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = clip_loss(ls, lt, torch.tensor(5.0), world_size=world, rank=rank)
    loss.backward()
    lossr = loss.detach().clone()
    dist.all_reduce(lossr)
    out[rank] = (float(lossr) / world, ls.grad.clone(), lt.grad.clone())
    dist.destroy_process_group()


def test_ddp_gather_matches_single_process():
    torch.manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
    ss, tt = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = clip_loss(ss, tt, torch.tensor(5.0), world_size=1, rank=0)
    ref.backward()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, s, t, out), nprocs=2, join=True)
    loss0 = out[0][0]
    assert loss0 == pytest.approx(float(ref.detach()), rel=1e-9)
    # A rank's feature gradient is world × d(global loss)/d(its rows); DDP's averaging of
    # parameter gradients over the ranks then gives exactly the single-process gradient.
    for r in range(2):
        sl = slice(r * 4, (r + 1) * 4)
        assert torch.allclose(out[r][1], 2 * ss.grad[sl])
        assert torch.allclose(out[r][2], 2 * tt.grad[sl])


def test_slide_standardisation_uses_training_stats(tok_path):
    torch.manual_seed(0)
    cfg = AlignModelConfig(embed_dim=16, slide_proj="linear", text=TEXT)
    model = SlideTextModel(cfg, 10, tok_path).eval()
    train = torch.randn(30, 10) * torch.linspace(0.01, 5, 10) + 3.0
    model.set_slide_stats(train)
    x = torch.randn(4, 10)
    mean, std = train.mean(0), train.std(0)
    ref = torch.nn.functional.normalize(model.slide_proj((x - mean) / std), dim=-1)
    assert torch.allclose(model.encode_slide(embeddings=x), ref, atol=1e-6)
    assert "slide_mean" in model.state_dict()  # saved with the checkpoint


def test_mean_pooled_tower_ignores_padding(tok_path):
    from slidefm.encoders.text import SentencePieceTextTower, TextTowerConfig

    torch.manual_seed(0)
    cfg = TextTowerConfig(**{**TEXT, "pool": "mean"})
    tower = SentencePieceTextTower(cfg, 400).eval()
    ids = torch.tensor([[2, 50, 60, 3] + [0] * 20])
    out = tower(ids)
    # reference: the same transformer's per-token outputs, averaged over the 4 real tokens
    with torch.no_grad():
        tokens = tower.transformer(ids)[0, :4]
    assert torch.allclose(out[0], tokens.mean(0), atol=1e-6)
    short = tower(torch.tensor([[2, 50, 60, 3]]))  # no padding at all (positions the same)
    assert torch.allclose(out, short, atol=1e-5)
