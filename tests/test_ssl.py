"""DINOv2-style SSL pieces checked against their formulas, naive loops and timm itself."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from slidefm.encoders.registry import build_model, get_spec
from slidefm.encoders.ssl import (
    DINOModel,
    SSLConfig,
    block_masks,
    dino_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    vit_tokens,
)
from slidefm.eval.rankme import odcorr

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = SSLConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8)


def _tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw}).eval()


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "no_embed_class": True}])
def test_vit_tokens_equals_timm_forward_features(kw):
    m = _tiny_vit(**kw)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(vit_tokens(m, x), m.forward_features(x), atol=1e-6)


def test_vit_tokens_other_size_matches_timm_dynamic_img_size():
    m = _tiny_vit()
    ref = _tiny_vit(dynamic_img_size=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 16, 24)
    assert torch.allclose(vit_tokens(m, x), ref.forward_features(x), atol=1e-5)


def test_masked_patch_pixels_do_not_reach_the_output():
    m = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True  # patch (row 1, col 1) = pixels [8:16, 8:16]
    tok = torch.randn(1, 1, 16)
    y = x.clone()
    y[:, :, 8:16, 8:16] = torch.randn(2, 3, 8, 8) * 5
    a, b = vit_tokens(m, x, mask, tok), vit_tokens(m, y, mask, tok)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(vit_tokens(m, x), vit_tokens(m, y), atol=1e-3)


def test_dino_loss_matches_naive_cross_entropy():
    torch.manual_seed(1)
    s = torch.randn(5, 4, 7)  # 2 global + 3 local crops
    t = torch.softmax(torch.randn(2, 4, 7), -1)
    terms = []
    for ti in range(2):
        for si in range(5):
            if si != ti:
                for b in range(4):
                    p = torch.softmax(s[si, b] / 0.1, -1)
                    terms.append(-(t[ti, b] * torch.log(p)).sum())
    assert torch.allclose(dino_loss(s, t, 0.1), torch.stack(terms).mean(), atol=1e-5)


def test_ibot_loss_averages_tokens_within_then_across_images():
    torch.manual_seed(2)
    s, t = torch.randn(5, 6), torch.softmax(torch.randn(5, 6), -1)
    owner = torch.tensor([0, 0, 0, 2, 2])
    tok = [-(t[i] * F.log_softmax(s[i] / 0.1, -1)).sum() for i in range(5)]
    ref = (sum(tok[:3]) / 3 + sum(tok[3:]) / 2) / 2
    assert torch.allclose(ibot_loss(s, t, owner, 4, 0.1), ref, atol=1e-5)


def test_sinkhorn_knopp_gives_balanced_prototypes():
    torch.manual_seed(3)
    logits = torch.randn(64, 8) * 3
    q = sinkhorn_knopp(logits, temp=1.0, iters=200)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((8,), 64 / 8), atol=1e-2)
    # few iterations: rows still sum to 1 (last step normalises them)
    assert torch.allclose(sinkhorn_knopp(logits, 1.0, 3).sum(1), torch.ones(64), atol=1e-5)


def test_koleo_matches_brute_force_nearest_neighbour():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 5))
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.diag(np.full(10, np.inf))
    ref = -np.log(d.min(1) + 1e-8).mean()
    assert koleo_loss(torch.tensor(x)).item() == pytest.approx(ref, rel=1e-6)


def test_block_masks_share_and_ratio():
    torch.manual_seed(5)
    m = block_masks(40, 7, 7, (0.1, 0.5), prob=0.5)
    per = m.float().mean(1)
    assert int((per > 0).sum()) == 20
    assert per[per > 0].min() >= 0.1 - 1e-6 and per.max() <= 0.75


def test_odcorr_matches_numpy_corrcoef():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(50, 6))
    z[:, 1] += 2 * z[:, 0]
    c = np.corrcoef(z.T)
    ref = np.abs(c[~np.eye(6, dtype=bool)]).mean()
    assert odcorr(z) == pytest.approx(ref, rel=1e-9)
    assert odcorr(np.repeat(z[:, :1], 4, axis=1)) == pytest.approx(1.0)


def test_teacher_at_step_zero_is_the_loaded_model_and_ema_follows(tmp_path):
    from safetensors.torch import save_file

    from slidefm.encoders.tile import TileEncoder, preprocess_tiles
    from slidefm.train.tile_ssl import build_trunk

    spec = get_spec("vit_tiny_dev")
    torch.manual_seed(7)
    src = build_model(spec)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    trunk, wid = build_trunk("vit_tiny_dev", str(path))
    assert wid.startswith("w.safetensors@sha256:")
    model = DINOModel(trunk, SMALL, spec.pooling)
    for k, v in src.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[k], v), k
        assert torch.equal(model.student.state_dict()[k], v), k
    tiles = np.random.default_rng(0).integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    ref = TileEncoder.create("vit_tiny_dev", weights=str(path), device="cpu")(tiles)
    got = model.eval().teacher_embed(preprocess_tiles(tiles, spec))
    assert torch.allclose(got, ref, atol=1e-6)
    # one EMA step with momentum m: teacher = m·teacher + (1 − m)·student
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = copy.deepcopy(model.teacher.state_dict())
    model.on_optimizer_step(3, 10)
    m = 1 - (1 - SMALL.momentum_teacher) * (math.cos(math.pi * 3 / 10) + 1) / 2
    stud = model.student.state_dict()
    for k, v in model.teacher.named_parameters():
        assert torch.allclose(v, m * before[k] + (1 - m) * stud[k], atol=1e-6), k
    assert model.momentum(0, 10) == pytest.approx(SMALL.momentum_teacher)
    assert model.momentum(10, 10) == pytest.approx(1.0)


def test_forward_backward_only_student_gets_gradients():
    spec = get_spec("vit_tiny_dev")
    torch.manual_seed(8)
    model = DINOModel(build_model(spec), SMALL, spec.pooling).train()
    batch = {"global": torch.randn(4, 2, 3, 32, 32), "local": torch.randn(4, 3, 3, 16, 16)}
    loss, met = model(batch)
    loss.backward()
    assert math.isfinite(loss.item()) and {"dino_loss", "ibot_loss", "koleo_loss"} <= set(met)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.patch_embed.proj.weight.grad is not None
    assert model.mask_token.grad is not None
