"""SlideEncoder: backends equal the naive oracle, padding/permutation behaviour, checkpoints."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from slidefm.config import ConfigError
from slidefm.models.posenc import sincos_2d
from slidefm.models.slide_encoder import SlideEncoder, SlideEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


D = 24


def tiny(**kw):
    base = dict(input_dim=D, d_model=32, depth=2, num_heads=4, mlp_ratio=2.0, backend="naive")
    torch.manual_seed(0)
    return SlideEncoder(SlideEncoderConfig(**{**base, **kw})).eval()


def longnet(**kw):
    return tiny(
        position="sincos2d",
        attention="dilated",
        segment_lengths=(8, 32, 128),
        dilation_ratios=(1, 2, 4),
        **kw,
    )


def slide(n, seed, side=40):
    """n tiles on distinct random grid cells of a side × side grid."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(side * side, size=n, replace=False)
    grid = np.stack([cells % side, cells // side], -1)
    return torch.from_numpy(rng.normal(size=(n, D)).astype(np.float32)), torch.from_numpy(grid)


def batch(sizes, seed=0, side=40):
    n = max(sizes)
    feats, grid = torch.zeros(len(sizes), n, D), torch.zeros(len(sizes), n, 2, dtype=torch.long)
    pad = torch.ones(len(sizes), n, dtype=torch.bool)
    for i, k in enumerate(sizes):
        f, g = slide(k, seed + i, side)
        feats[i, :k], grid[i, :k], pad[i, :k] = f, g, False
        feats[i, k:] = 100.0  # garbage in padding must not leak
    return feats, grid, pad


ARCHS = {
    "alibi_cls": dict(),
    "alibi_regs_mean": dict(num_register_tokens=2, readout="mean"),
    "alibi_attn_nocls": dict(cls_token=False, readout="attn", input_proj="mlp"),
    "sincos_full": dict(position="sincos2d", num_register_tokens=1),
    "nopos": dict(position="none", readout="mean"),
}


def build(arch, **kw):
    if arch == "longnet":
        return longnet(num_register_tokens=1, **kw)
    return tiny(**ARCHS[arch], **kw)


@pytest.mark.parametrize("arch", [*ARCHS, "longnet"])
def test_sdpa_equals_naive_with_padding_and_prefix(arch):
    ref_enc, enc = build(arch), build(arch, backend="sdpa", attn_block_size=37)
    enc.load_state_dict(ref_enc.state_dict())
    feats, grid, pad = batch([300, 117, 29])
    with torch.no_grad():
        ref_p, ref_t = ref_enc.forward_tokens(feats, grid, pad)
        got_p, got_t = enc.forward_tokens(feats, grid, pad)
        torch.testing.assert_close(
            enc(feats, grid, pad), ref_enc(feats, grid, pad), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(got_p, ref_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, ref_t, atol=1e-5, rtol=1e-5)
    assert (got_t[pad] == 0).all()


def test_sdpa_equals_naive_for_a_few_thousand_tiles():
    ref_enc = tiny(num_register_tokens=2)
    enc = tiny(num_register_tokens=2, backend="sdpa")  # default block of 1024 queries
    feats, grid, pad = batch([2500, 1800], seed=3, side=80)
    with torch.no_grad():
        torch.testing.assert_close(
            enc(feats, grid, pad), ref_enc(feats, grid, pad), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("arch", ["alibi_cls", "longnet"])
def test_gradients_equal_naive(arch):
    """float64, so any difference beyond rounding shows (blocks are checkpointed in sdpa)."""
    ref_enc = build(arch).double()
    enc = build(arch, backend="sdpa", attn_block_size=16).double()
    feats, grid, pad = batch([60, 41])
    feats = feats.double()
    grads = []
    for m in (ref_enc, enc):
        m.train()
        m.zero_grad()
        m(feats, grid, pad).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-10, rtol=1e-9, msg=n)


@pytest.mark.parametrize("arch", ["alibi_cls", "alibi_attn_nocls", "longnet"])
def test_padding_and_batch_company_do_not_change_a_slide(arch):
    enc = build(arch, backend="sdpa")
    feats, grid, pad = batch([50, 90, 13], seed=5)
    with torch.no_grad():
        together = enc(feats, grid, pad)
        for i, k in enumerate([50, 90, 13]):
            alone = enc(feats[i : i + 1, :k], grid[i : i + 1, :k])
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["alibi_cls", "alibi_regs_mean", "sincos_full", "longnet"])
def test_shuffling_tiles_with_their_grid_keeps_the_embedding(arch):
    enc = build(arch, backend="sdpa")
    f, g = slide(150, seed=7)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = enc(f[None], g[None])
        z_perm = enc(f[perm][None], g[perm][None])
        moved = g.clone()
        moved[:75] += torch.tensor([50, 3])  # split the slide in two distant halves
        z_moved = enc(f[None], moved[None])
    torch.testing.assert_close(z_perm, z, atol=1e-5, rtol=1e-5)
    assert (z_moved - z).abs().max() > 1e-3


def test_token_mask_hides_the_input():
    enc = tiny(backend="sdpa")
    feats, grid, pad = batch([40, 30])
    hide = torch.zeros_like(pad)
    hide[:, 5:15] = True
    other = feats.clone()
    other[hide] = torch.randn(int(hide.sum()), D)
    with torch.no_grad():
        a = enc.forward_tokens(feats, grid, pad, token_mask=hide)
        b = enc.forward_tokens(other, grid, pad, token_mask=hide)
        c = enc.forward_tokens(other, grid, pad)
    torch.testing.assert_close(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])
    assert (a[0] - c[0]).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    feats, grid, pad = batch([40, 25])
    grads = []
    for ckpt in (False, True):
        enc = tiny(backend="sdpa", grad_checkpointing=ckpt).train()
        enc(feats, grid, pad).sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["alibi_regs_mean", "longnet"])
def test_bf16_autocast_is_close_to_fp32(arch):
    enc = build(arch, backend="sdpa")
    feats, grid, pad = batch([200, 120])
    with torch.no_grad():
        ref = enc(feats, grid, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(feats, grid, pad)
    assert torch.isfinite(low).all()
    cos = torch.nn.functional.cosine_similarity(low.float(), ref, dim=-1)
    assert (cos > 0.99).all()


def test_checkpoint_round_trip(tmp_path):
    enc = tiny(num_register_tokens=1, readout="attn")
    path = enc.save_checkpoint(tmp_path / "enc.pt", extra={"seed": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["enc.pt"]  # atomic: no temporary left
    feats, grid, pad = batch([30, 20])
    back = SlideEncoder.from_checkpoint(path, backend="sdpa").eval()
    assert back.config == dataclasses.replace(enc.config, backend="sdpa")
    fresh = tiny(num_register_tokens=1, readout="attn", backend="sdpa")
    fresh.lm = None
    torch.manual_seed(1)
    meta = fresh.load_checkpoint(path)
    assert meta["extra"] == {"seed": 3} and meta["slidefm_version"]
    with torch.no_grad():
        ref = enc(feats, grid, pad)
        torch.testing.assert_close(back(feats, grid, pad), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh.eval()(feats, grid, pad), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different architecture"):
        tiny(depth=3).load_checkpoint(path)
    with pytest.raises(ValueError, match="cannot override"):
        SlideEncoder.from_checkpoint(path, depth=4)
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"x": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a slidefm"):
        SlideEncoder.from_checkpoint(tmp_path / "junk.pt")


def test_named_configs_have_the_reference_shapes():
    titan = SlideEncoder.from_config("titan_like").config
    assert (titan.depth, titan.d_model, titan.num_heads, titan.input_dim) == (6, 768, 12, 768)
    assert (titan.position, titan.attention) == ("alibi2d", "full")
    giga = SlideEncoder.from_config("gigapath_like", depth=1).config  # overrides apply
    assert (giga.d_model, giga.num_heads, giga.input_dim, giga.depth) == (768, 16, 1536, 1)
    assert giga.segment_lengths == (1024, 5792, 32768, 185363, 1048576)
    assert giga.dilation_ratios == (1, 2, 4, 8, 16)
    enc = SlideEncoder.from_config("tiny")
    assert enc.embed_dim == enc.config.d_model and enc.config.name == "tiny"
    f, g = slide(20, 0)
    with torch.no_grad():
        z = SlideEncoder.from_config("tiny_longnet", input_dim=D)(f[None], g[None])
    assert z.shape == (1, 64)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(attention="dilated", position="alibi2d"), "sincos2d"),
        (dict(readout="cls", cls_token=False), "cls_token"),
        (dict(backend="cuda_magic"), "backend"),
        (dict(num_heads=5), "divisible"),
    ],
)
def test_bad_configs_say_what_to_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        SlideEncoderConfig(**{"input_dim": D, "d_model": 32, "num_heads": 4, **kw})


def test_wrong_feature_width_is_explained():
    enc = tiny()
    with pytest.raises(ValueError, match="input_dim"):
        enc(torch.zeros(1, 3, D + 1), torch.zeros(1, 3, 2, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["alibi_regs_mean", "longnet"])
def test_flex_equals_naive_inference(arch):
    """FlexAttention computes the ALiBi bias inside score_mod (CPU: compiled, inference only)."""
    ref_enc, enc = build(arch), build(arch, backend="flex")
    feats, grid, pad = batch([120, 77])
    with torch.no_grad():
        torch.testing.assert_close(
            enc(feats, grid, pad), ref_enc(feats, grid, pad), atol=1e-5, rtol=1e-5
        )


def test_sincos_2d_formula():
    grid = torch.tensor([[0, 0], [3, 7], [120, 45]])
    got = sincos_2d(grid, 16)
    omega = [10000.0 ** (-i / 4) for i in range(4)]
    for n, (c, r) in enumerate(grid.tolist()):
        want = [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
        want += [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
        torch.testing.assert_close(got[n], torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_input_standardisation_equals_standardised_features(tmp_path):
    """Stats inside the encoder ≡ the same encoder fed (x − mean) / std computed by hand; they
    travel with the checkpoint, and checkpoints without them load as mean 0, std 1."""
    g = torch.Generator().manual_seed(1)
    x = 5.0 + 3.0 * torch.randn(2, 20, D, generator=g)
    grid = torch.randint(0, 6, (2, 20, 2), generator=g)
    mean, std = x.mean((0, 1)), x.std((0, 1))
    plain, withstats = tiny(), tiny()
    withstats.set_input_stats(mean, std)
    torch.testing.assert_close(withstats(x, grid), plain((x - mean) / std, grid))
    withstats.save_checkpoint(tmp_path / "s.pt")
    torch.testing.assert_close(
        SlideEncoder.from_checkpoint(tmp_path / "s.pt")(x, grid), withstats(x, grid)
    )
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    for k in ("input_mean", "input_std"):
        del payload["state_dict"][k]
    # such files predate the one checkpoint format: write the format of that time
    old_format = {"format": "slidefm.slide_encoder", "config": payload["config"],
                  "state_dict": payload["state_dict"], "slidefm_version": "0.0", "extra": {}}  # fmt: skip
    torch.save(old_format, tmp_path / "old.pt")
    old = SlideEncoder.from_checkpoint(tmp_path / "old.pt")
    assert torch.equal(old.input_mean, torch.zeros(D)) and torch.equal(old.input_std, torch.ones(D))
    torch.testing.assert_close(old(x, grid), plain(x, grid))
