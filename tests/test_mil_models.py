"""MIL models: padding never matters, attention is a distribution over real tiles, the Nyström
path matches exact attention where it must, PPEG mixes true grid neighbours only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from slidefm.models.mil import (
    ABMIL,
    PPEG,
    NystromAttention,
    SlideEncoderMIL,
    TransMIL,
    build_mil_model,
    class_weights,
    mil_loss,
)

D = 16


def bag(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, D, generator=g)
    side = int(np.ceil(np.sqrt(n))) + 2
    cells = torch.randperm(side * side, generator=g)[:n]
    grid = torch.stack([cells % side, cells // side], -1)
    return feats, grid


def padded_batch(bags):
    n = max(f.shape[0] for f, _ in bags)
    feats = torch.randn(len(bags), n, D) * 100  # garbage in the padding
    grid = torch.randint(0, 50, (len(bags), n, 2))
    pad = torch.ones(len(bags), n, dtype=torch.bool)
    for i, (f, g) in enumerate(bags):
        feats[i, : len(f)], grid[i, : len(f)], pad[i, : len(f)] = f, g, False
    return feats, grid, pad


class MaskedMeanEncoder(torch.nn.Module):
    """Stand-in slide encoder: masked mean of a linear map (what matters is the wrapper)."""

    embed_dim = 8

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, 8)

    def forward(self, features, grid, padding_mask):
        keep = (~padding_mask).unsqueeze(-1).float()
        return (self.lin(features) * keep).sum(1) / keep.sum(1)


def make(name):
    if name == "slide_encoder":
        return SlideEncoderMIL(MaskedMeanEncoder(), D, 3)
    if name == "slide_encoder_tiny":  # the real 2D-ALiBi transformer
        from slidefm.models.slide_encoder import SlideEncoder

        return SlideEncoderMIL(SlideEncoder.from_config("tiny", input_dim=D), D, 3)
    if name == "transmil":
        return TransMIL(D, 3, dim=32, heads=4, num_landmarks=8)  # bags > 8 tiles use Nyström
    return build_mil_model(name, D, 3)


@pytest.mark.parametrize(
    "name", ["mean", "max", "abmil", "transmil", "slide_encoder", "slide_encoder_tiny"]
)
def test_padding_does_not_change_outputs(name):
    torch.manual_seed(0)
    model = make(name).eval()
    bags = [bag(5, 1), bag(23, 2), bag(12, 3)]
    feats, grid, pad = padded_batch(bags)
    with torch.no_grad():
        out = model(feats, grid, pad)
        assert out["logits"].shape == (3, 3)
        for i, (f, g) in enumerate(bags):
            alone = model(f[None], g[None], torch.zeros(1, len(f), dtype=torch.bool))
            torch.testing.assert_close(out["logits"][i], alone["logits"][0], atol=1e-5, rtol=1e-4)
            if "attention" in out:
                torch.testing.assert_close(
                    out["attention"][i, : len(f)], alone["attention"][0], atol=1e-6, rtol=1e-5
                )
                assert torch.all(out["attention"][i, len(f) :] == 0)


def test_abmil_attention_is_gated_softmax():
    torch.manual_seed(1)
    m = ABMIL(D, 2, hidden=12, attn_dim=6).eval()
    f, g = bag(9, 4)
    with torch.no_grad():
        out = m(f[None], g[None])
        h = F.relu(f @ m.tile[0].weight.T + m.tile[0].bias)
        v = torch.tanh(h @ m.attn_v[0].weight.T + m.attn_v[0].bias)
        u = torch.sigmoid(h @ m.attn_u[0].weight.T + m.attn_u[0].bias)
        a = (v * u) @ m.attn_w.weight[0] + m.attn_w.bias
        w = torch.exp(a - a.max()) / torch.exp(a - a.max()).sum()
        logits = (w[:, None] * h).sum(0) @ m.head.weight.T + m.head.bias
    torch.testing.assert_close(out["attention"][0], w)
    torch.testing.assert_close(out["logits"][0], logits, atol=1e-5, rtol=1e-5)
    assert out["attention"].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_nystrom_is_exact_when_landmarks_are_the_tokens():
    """Duplicated token pairs + m = n/2 landmarks: each landmark equals a distinct token, so
    softmax(QK_l) pinv(softmax(Q_lK_l)) softmax(Q_lK) V equals exact attention."""
    torch.manual_seed(2)
    m = 6
    attn = NystromAttention(dim=16, heads=2, num_landmarks=m, dropout=0.0).eval()
    distinct = torch.randn(1, m, 16)
    x = distinct.repeat_interleave(2, dim=1)  # [1, 2m, 16], tokens 2i and 2i+1 identical
    with torch.no_grad():
        approx = attn(x)
        q, k, v = attn.qkv(x).chunk(3, -1)
        q, k, v = (t.reshape(1, 2 * m, 2, 8).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(8), -1)
        exact = attn.out((w @ v).transpose(1, 2).reshape(1, 2 * m, 16))
    torch.testing.assert_close(approx, exact, atol=1e-4, rtol=1e-4)


def test_ppeg_mixes_only_grid_neighbours():
    torch.manual_seed(3)
    ppeg = PPEG(4).eval()
    grid = torch.tensor([[0, 0], [1, 0], [10, 10], [3, 3], [4, 4]])
    h = torch.randn(5, 4)
    with torch.no_grad():
        base = ppeg(h, grid)
        far = h.clone()
        far[2] += 5.0  # 10 cells away: outside the 7×7 receptive field of tile 0
        torch.testing.assert_close(ppeg(far, grid)[0], base[0])
        near = h.clone()
        near[3] += 5.0  # 3 cells away diagonally: inside the 7×7 window
        assert not torch.allclose(ppeg(near, grid)[0], base[0])


def test_frozen_slide_encoder_trains_only_the_head():
    enc = MaskedMeanEncoder()
    m = SlideEncoderMIL(enc, D, 2, freeze=True)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head") for n in trainable)
    m.train()
    assert not m.encoder.training and m.head.training
    tuned = SlideEncoderMIL(MaskedMeanEncoder(), D, 2, freeze=False)
    assert all(p.requires_grad for p in tuned.parameters())


def test_class_weights_and_weighted_losses():
    y = torch.tensor([0, 0, 0, 0, 1, 2, 2, 0])
    w = class_weights(y, 3)
    ref = compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6)
    logits = torch.randn(8, 3)
    logp = torch.log_softmax(logits, -1)
    manual = -(w[y] * logp[torch.arange(8), y]).sum() / w[y].sum()
    torch.testing.assert_close(mil_loss(logits, y, weight=w), manual)
    yl = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 0]])
    pw = class_weights(yl, 2, multilabel=True)
    torch.testing.assert_close(pw, torch.tensor([1 / 3, 3.0]))
    lg = torch.randn(4, 2)
    p = torch.sigmoid(lg)
    manual_bce = -(pw * yl * torch.log(p) + (1 - yl) * torch.log(1 - p)).mean()
    torch.testing.assert_close(mil_loss(lg, yl, multilabel=True, weight=pw), manual_bce)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="abmil"):
        build_mil_model("clam_mb", D, 2)
    with pytest.raises(ValueError, match="slide encoder"):
        build_mil_model("slide_encoder", D, 2)


@pytest.mark.parametrize("name", ["abmil", "mean", "transmil"])
def test_models_learn_a_witness_bag_task(name):
    """Bag is positive when it holds a few 'tumour' tiles (feature 0 shifted): every model must fit it."""
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    bags, ys = [], []
    for i in range(40):
        f, g = bag(int(rng.integers(10, 20)), 100 + i)
        y = i % 2
        if y:
            f[:4, 0] += 4.0
        bags.append((f, g))
        ys.append(y)
    feats, grid, pad = padded_batch(bags)
    y = torch.tensor(ys)
    model = (
        TransMIL(D, 2, dim=32, heads=4, num_landmarks=32)  # exact attention: speed
        if name == "transmil"
        else build_mil_model(name, D, 2)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = mil_loss(model(feats, grid, pad)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(feats, grid, pad)["logits"].argmax(1) == y).float().mean().item()
    assert acc >= 0.9


def test_checkpoint_round_trip(tmp_path):
    from slidefm.models.mil import load_mil_checkpoint, save_mil_checkpoint

    torch.manual_seed(5)
    m = build_mil_model("abmil", D, 3, hidden=20).eval()
    meta = {
        "model": "abmil",
        "in_dim": D,
        "num_classes": 3,
        "model_kwargs": {"hidden": 20},
        "task": {"labels": ["x"]},
    }
    p = save_mil_checkpoint(tmp_path / "m.pt", m, meta)
    back, meta2 = load_mil_checkpoint(p)
    f, g = bag(11, 6)
    with torch.no_grad():
        torch.testing.assert_close(back(f[None], g[None])["logits"], m(f[None], g[None])["logits"])
    assert meta2["task"] == {"labels": ["x"]} and not back.training
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a slidefm MIL checkpoint"):
        load_mil_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("name", ["mean", "max", "abmil", "transmil", "slide_encoder"])
def test_head_configs_match_the_model_constructors(name):
    """Each typed ``model_kwargs`` dataclass has exactly the constructor's tunable keyword
    arguments with the same defaults, so an empty mapping builds the model's own default."""
    import dataclasses
    import inspect

    from slidefm.models.mil import ABMIL, PoolMIL, SlideEncoderMIL, TransMIL
    from slidefm.models.mil_config import head_config

    cls = {"mean": PoolMIL, "max": PoolMIL, "abmil": ABMIL, "transmil": TransMIL,
           "slide_encoder": SlideEncoderMIL}[name]  # fmt: skip
    fixed = {"self", "in_dim", "num_classes", "encoder", "pool", "freeze"}  # set by the caller
    sig = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
           if k not in fixed}  # fmt: skip
    head = head_config(name, {})
    assert {f.name: getattr(head, f.name) for f in dataclasses.fields(head)} == sig


def test_mil_config_types_model_kwargs():
    from slidefm.config import ConfigError, from_dict
    from slidefm.models.mil_config import ABMILHead, TransMILHead
    from slidefm.train.mil import MILConfig

    cfg = from_dict(MILConfig, {"model": "transmil", "model_kwargs": {"dim": 16, "heads": 2}})
    assert cfg.model_kwargs == TransMILHead(dim=16, heads=2)
    assert MILConfig(model_kwargs={"hidden": 8}).model_kwargs == ABMILHead(hidden=8)
    with pytest.raises(ConfigError, match="model_kwargs of abmil.*heads"):
        from_dict(MILConfig, {"model": "abmil", "model_kwargs": {"heads": 2}})
    with pytest.raises(ConfigError, match="hidden"):
        from_dict(MILConfig, {"model": "mean", "model_kwargs": {"hidden": "wide"}})
