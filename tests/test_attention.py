"""Attention backends against the naive oracle, and the oracle against an explicit reference."""

import math

import numpy as np
import pytest
import torch

import slidefm.models.attention as attn
from slidefm.models.alibi import alibi_slopes
from slidefm.models.attention import attention_with_lse, full_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(bsz, heads, n_tiles, n_prefix, dh=8, seed=0, side=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    total = n_prefix + n_tiles
    q, k, v = (torch.randn(bsz, heads, total, dh, generator=gen, dtype=dtype) for _ in range(3))
    grid = torch.randint(0, side, (bsz, n_tiles, 2), generator=gen)
    pad = torch.zeros(bsz, total, dtype=torch.bool)
    for b in range(1, bsz):  # batch element b has b·7 padded tiles at the end
        pad[b, total - 7 * b :] = True
    return q, k, v, grid, pad


def reference(q, k, v, grid, pad, n_prefix, heads):
    """Per-sample numpy: bias from the formula, softmax over the real keys only."""
    slopes = [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]  # power-of-two H
    q, k, v, grid = (x.double().numpy() for x in (q, k, v, grid))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        keys = [j for j in range(q.shape[2]) if not pad[b, j]]
        for h in range(heads):
            for i in range(q.shape[2]):
                s = []
                for j in keys:
                    d = 0.0
                    if i >= n_prefix and j >= n_prefix:
                        d = math.dist(grid[b, i - n_prefix], grid[b, j - n_prefix])
                    s.append(q[b, h, i] @ k[b, h, j] / math.sqrt(q.shape[-1]) - slopes[h] * d)
                p = np.exp(np.array(s) - max(s))
                out[b, h, i] = (p / p.sum()) @ v[b, h, keys]
    return torch.from_numpy(out)


def test_naive_equals_explicit_reference():
    q, k, v, grid, pad = inputs(2, 4, 13, 2)
    got = full_attention(
        q,
        k,
        v,
        "naive",
        grid=grid,
        slopes=alibi_slopes(4),
        num_prefix_tokens=2,
        key_padding_mask=pad,
    )
    torch.testing.assert_close(
        got.double(), reference(q, k, v, grid, pad, 2, 4), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("n_tiles, n_prefix, block", [(40, 0, 16), (301, 1, 64), (2000, 3, 512)])
def test_sdpa_equals_naive(n_tiles, n_prefix, block, alibi):
    q, k, v, grid, pad = inputs(3, 4, n_tiles, n_prefix, seed=n_tiles)
    kw = dict(
        grid=grid,
        slopes=alibi_slopes(4) if alibi else None,
        num_prefix_tokens=n_prefix,
        key_padding_mask=pad,
    )
    ref = full_attention(q, k, v, "naive", **kw)
    got = full_attention(q, k, v, "sdpa", block_size=block, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_equal_naive_float64():
    q, k, v, grid, pad = inputs(2, 4, 90, 2, dtype=torch.float64)
    grads = []
    for backend in ("naive", "sdpa"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = full_attention(
            *leaves,
            backend,
            grid=grid,
            slopes=alibi_slopes(4),
            num_prefix_tokens=2,
            key_padding_mask=pad,
            block_size=16,
        )
        out.pow(2).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def test_blockwise_bias_never_covers_more_than_a_block(monkeypatch):
    seen = []
    real = attn.alibi_2d_bias_block

    def spy(grid, slopes, s, e, *a, **kw):
        seen.append((s, e))
        return real(grid, slopes, s, e, *a, **kw)

    monkeypatch.setattr(attn, "alibi_2d_bias_block", spy)
    q, k, v, grid, pad = inputs(2, 4, 1000, 1)
    full_attention(
        q,
        k,
        v,
        "sdpa",
        grid=grid,
        slopes=alibi_slopes(4),
        num_prefix_tokens=1,
        key_padding_mask=pad,
        block_size=128,
    )
    assert max(e - s for s, e in seen) == 128
    assert [s for s, _ in seen] == list(range(0, 1001, 128))  # rows covered once, in order
    # and the block shrinks so that one block never exceeds MAX_BLOCK_ELEMENTS
    assert attn._block_rows(1024, 1, 16, 1_000_000) * 16 * 1_000_000 <= attn.MAX_BLOCK_ELEMENTS


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_attention_with_lse(backend):
    q, k, v, _, pad = inputs(3, 2, 20, 0)
    pad[2] = True  # no real key at all
    out, lse = attention_with_lse(q, k, v, pad, backend)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)
    for b in range(2):
        keys = ~pad[b]
        ref_lse = torch.logsumexp(scores[b][..., keys], -1)
        ref = torch.softmax(scores[b][..., keys], -1) @ v[b][:, keys].double()
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()


def test_unknown_and_unavailable_backends_explain_themselves():
    q, k, v, grid, pad = inputs(1, 2, 5, 0)
    with pytest.raises(ValueError, match="Unknown attention backend"):
        full_attention(q, k, v, "magic")
    with pytest.raises(ValueError, match="CUDA only"):
        full_attention(q, k, v, "xformers")
    with pytest.raises(ValueError, match="inference only"):
        full_attention(q.requires_grad_(), k, v, "flex")


@pytest.mark.slow
def test_flex_equals_naive_inference():
    """Compiled FlexAttention (CPU: inference only, ~10-30 s to compile)."""
    q, k, v, grid, pad = inputs(2, 4, 150, 1)
    kw = dict(grid=grid, slopes=alibi_slopes(4), num_prefix_tokens=1, key_padding_mask=pad)
    with torch.no_grad():
        got = full_attention(q, k, v, "flex", **kw)
    torch.testing.assert_close(got, full_attention(q, k, v, "naive", **kw), atol=1e-5, rtol=1e-5)
