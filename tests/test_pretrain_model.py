"""Masked feature modeling: block masks, the loss on hidden tiles only, distillation, EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bag_utils import random_grid

from slidefm.models.pretrain import (
    MaskedFeatureModel,
    PretrainConfig,
    block_mask,
    dino_loss,
    feature_stats,
)
from slidefm.models.slide_encoder import SlideEncoder, SlideEncoderConfig

D = 8


def tiny_encoder(**kw):
    cfg = dict(name="t", input_dim=D, d_model=16, depth=2, num_heads=2, dropout=0.1)
    return SlideEncoder(SlideEncoderConfig(**{**cfg, **kw}))


def make_batch(seed=0, sizes=(30, 18), side=8):
    rng = np.random.default_rng(seed)
    n = max(sizes)
    feats = torch.zeros(len(sizes), n, D)
    grid = torch.zeros(len(sizes), n, 2, dtype=torch.long)
    pad = torch.ones(len(sizes), n, dtype=torch.bool)
    for i, k in enumerate(sizes):
        feats[i, :k] = torch.from_numpy(rng.normal(size=(k, D)).astype(np.float32))
        grid[i, :k] = torch.from_numpy(random_grid(rng, k, side).astype(np.int64))
        pad[i, :k] = False
    return {"features": feats, "grid": grid, "padding_mask": pad}


def dense_grid(side):
    c, r = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([c.ravel(), r.ravel()], -1)


def test_block_mask_exact_count_never_padding():
    torch.manual_seed(0)
    b = make_batch(sizes=(30, 18, 1, 2))
    m = block_mask(b["grid"], b["padding_mask"], 0.4, 2, 4)
    assert m.dtype == torch.bool and m.shape == b["padding_mask"].shape
    assert not (m & b["padding_mask"]).any()
    assert m.sum(1).tolist() == [round(0.4 * 30), round(0.4 * 18), 1, 1]


def test_block_mask_is_spatially_clustered():
    """Hidden tiles touch each other far more often than under independent random masking."""
    torch.manual_seed(0)
    g = dense_grid(20).unsqueeze(0)  # 400 tiles
    m = block_mask(g, None, 0.3, 3, 5)[0]
    hidden = {tuple(x) for x in g[0][m].tolist()}
    assert len(hidden) == 120

    def adjacent_pairs(cells):
        return sum((c + 1, r) in cells for c, r in cells) + sum(
            (c, r + 1) in cells for c, r in cells
        )

    rand = {tuple(x) for x in g[0][torch.randperm(400)[:120]].tolist()}
    # Random 30% masking: expected pairs ≈ 760 edges × 0.3² ≈ 68; blocks give far more.
    assert adjacent_pairs(hidden) > 2 * adjacent_pairs(rand)
    with pytest.raises(ValueError):
        block_mask(g, None, 1.0)


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_loss_matches_manual_computation_on_hidden_tiles(loss):
    torch.manual_seed(0)
    model = MaskedFeatureModel(tiny_encoder(), PretrainConfig(loss=loss, decoder_dim=16))
    batch = make_batch()
    torch.manual_seed(5)
    loss_value, metrics = model(batch)
    torch.manual_seed(5)  # same mask
    out = model.predict(batch)
    m, x = out["mask"], batch["features"]
    # Independent target normalisation and loss: per-tile (x - mean) / sqrt(var + 1e-5).
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    t = ((x - mu) / torch.sqrt(var + 1e-5))[m]
    p = out["pred"][m].detach()
    if loss == "cosine":
        ref = np.mean([1 - float(a @ b / (a.norm() * b.norm())) for a, b in zip(p, t, strict=True)])
    else:
        ref = float(((p - t) ** 2).sum() / t.numel())
    assert float(loss_value.detach()) == pytest.approx(ref, rel=1e-5)
    assert metrics["mask_frac"] == pytest.approx(float(m.sum()) / float((~out["pad"]).sum()))


def test_gradient_flows_only_from_hidden_tiles():
    torch.manual_seed(0)
    model = MaskedFeatureModel(tiny_encoder(), PretrainConfig(decoder="mlp", decoder_dim=16))
    batch = make_batch()
    out = model.predict(batch)
    pred = out["pred"]
    pred.retain_grad()
    m = out["mask"]
    p, t = pred[m], out["target"][m]
    (1 - torch.nn.functional.cosine_similarity(p, t, dim=-1)).mean().backward()
    per_tile = pred.grad.abs().sum(-1)
    assert (per_tile[~m] == 0).all() and (per_tile[m] > 0).all()
    # The hidden tiles' inputs were replaced: changing them leaves the predictions unchanged.
    model.eval()
    b2 = {**batch, "features": batch["features"].clone()}
    b2["features"][m] += 5.0
    with torch.no_grad():
        p1 = model.predict(batch, token_mask=m)["pred"]
        p2 = model.predict(b2, token_mask=m)["pred"]
    torch.testing.assert_close(p1[~out["pad"]], p2[~out["pad"]], rtol=1e-5, atol=1e-5)


def test_dino_loss_against_naive_loop():
    g = torch.Generator().manual_seed(0)
    s, t, c = (
        torch.randn(3, 5, generator=g),
        torch.randn(3, 5, generator=g),
        torch.randn(5, generator=g),
    )
    total = 0.0
    for i in range(3):
        tz = [math.exp((t[i, k] - c[k]) / 0.04) for k in range(5)]
        sz = [math.exp(s[i, k] / 0.1) for k in range(5)]
        total += -sum(tz[k] / sum(tz) * math.log(sz[k] / sum(sz)) for k in range(5))
    assert float(dino_loss(s, t, c, 0.1, 0.04)) == pytest.approx(total / 3, rel=1e-5)


def test_ema_teacher_update_and_no_teacher_gradients():
    torch.manual_seed(0)
    cfg = PretrainConfig(distill_weight=1.0, ema_momentum=0.9, decoder_dim=16, distill_dim=8)
    model = MaskedFeatureModel(tiny_encoder(readout="attn"), cfg)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    loss, metrics = model(make_batch())
    assert "distill_loss" in metrics and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    # The distillation trains the encoder's own readout (attention pooling here). The score's
    # bias shifts every tile's logit equally, so softmax makes its gradient exactly zero (up to
    # rounding): it is the one parameter that must not be required to move.
    pool = dict(model.encoder.pool.named_parameters())
    assert float(pool.pop("score.bias").grad.abs().sum()) < 1e-6
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.values())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1)
    before = [p.clone() for p in model.teacher.parameters()]
    m = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2  # cosine from 0.9 towards 1
    assert model.ema_momentum(3, 10) == pytest.approx(m)
    model.on_optimizer_step(3, 10)
    for b, t, s in zip(before, model.teacher.parameters(), model.encoder.parameters(), strict=True):
        torch.testing.assert_close(t, m * b + (1 - m) * s)


def test_feature_stats_match_numpy_and_cap():
    rng = np.random.default_rng(0)
    bags = [rng.normal(3, 2, size=(n, 4)).astype(np.float32) for n in (10, 25, 7)]
    mean, std = feature_stats(bags)
    allx = np.concatenate(bags).astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), allx.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), allx.std(0), rtol=1e-5)
    m2, _ = feature_stats(bags, max_tiles=30)  # stops after the bag that reaches 30 tiles
    np.testing.assert_allclose(m2.numpy(), np.concatenate(bags[:2]).mean(0), rtol=1e-6)


def test_targets_are_standardised_then_tile_normalised():
    torch.manual_seed(0)
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    model = MaskedFeatureModel(tiny_encoder(), PretrainConfig(decoder_dim=16), (mean, std))
    batch = make_batch()
    out = model.predict(batch)
    z = (batch["features"] - mean) / std
    mu = z.mean(-1, keepdim=True)
    ref = (z - mu) / torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out["target"], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.state_dict()["target_std"], std)  # saved with the model
