"""Every attention backend × every position bias against the naive oracle, and the oracle
against an explicit numpy reference.

Parametrised from ``BACKENDS`` and ``BIASES`` themselves (as timm's registry tests are), so a
new backend or bias class is tested without editing this file. A backend that cannot run here
(xformers off CUDA, flex under gradients on CPU) is tested for its one-line error instead;
compiled backends (FlexAttention: ~10-30 s per compile on CPU) are marked slow.
"""

import math
import re

import numpy as np
import pytest
import torch

import slidefm.models.attention as attn
from slidefm.models.alibi import Alibi2DBias
from slidefm.models.attention import BACKENDS, BIASES, FullAttention, get_backend

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


def reference(q, k, v, grid, pad, n_prefix, heads, alibi=True):
    """Per-sample numpy: bias from the formula, softmax over the real keys only."""
    slopes = [2.0 ** (-8.0 * (h + 1) / heads) * alibi for h in range(heads)]  # power-of-two H
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


def backends() -> list:
    """One pytest param per backend of the table; compiled ones marked slow."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.slow] if cls.compiled else [])
        for name, cls in BACKENDS.items()
    ]


SIZES = [(40, 0, 16), (301, 1, 64), (2000, 3, 512)]  # (tiles, prefix tokens, block rows)


def backend_sizes() -> list:
    """Backend × size params; a compiled backend gets one size (each length is one compile)."""
    return [
        pytest.param(name, *size, id=f"{name}-{size[0]}", marks=p.marks)
        for p in backends()
        for name in p.values
        for size in (SIZES[1:2] if BACKENDS[name].compiled else SIZES)
    ]


def unavailable(name: str, needs_grad: bool = False) -> str | None:
    """Why ``name`` cannot run on this CPU (its error message), or None."""
    try:
        get_backend(name).check("cpu", needs_grad)
    except (ValueError, ImportError) as e:
        return str(e)
    return None


def make_bias(name, grid, heads, n_prefix):
    return BIASES[name].from_grid(grid, heads, n_prefix)


def attend(backend, q, k, v, bias=None, pad=None, block_size=1024):
    return FullAttention(backend, block_size)(q, k, v, bias, pad)


@pytest.mark.parametrize("bias", list(BIASES))
def test_naive_equals_explicit_reference(bias):
    q, k, v, grid, pad = inputs(2, 4, 13, 2)
    got = attend("naive", q, k, v, make_bias(bias, grid, 4, 2), pad)
    want = reference(q, k, v, grid, pad, 2, 4, alibi=bias == "alibi2d")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("backend, n_tiles, n_prefix, block", backend_sizes())
def test_backend_equals_naive(backend, n_tiles, n_prefix, block, bias):
    q, k, v, grid, pad = inputs(3, 4, n_tiles, n_prefix, seed=n_tiles)
    b = make_bias(bias, grid, 4, n_prefix)
    if why := unavailable(backend):
        with pytest.raises((ValueError, ImportError), match=re.escape(why)):
            attend(backend, q, k, v, b, pad)
        return
    with torch.no_grad():
        got = attend(backend, q, k, v, b, pad, block_size=block)
    ref = attend("naive", q, k, v, b, pad)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_gradients_equal_naive_float64(backend):
    q, k, v, grid, pad = inputs(2, 4, 90, 2, dtype=torch.float64)
    bias = Alibi2DBias.from_grid(grid, 4, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if why := unavailable(backend, needs_grad=True):
        with pytest.raises((ValueError, ImportError), match=re.escape(why)):
            attend(backend, *leaves, bias, pad, block_size=16)
        return
    grads = []
    for name in ("naive", backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attend(name, *leaves, bias, pad, block_size=16).pow(2).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


class _SpyBias(Alibi2DBias):
    seen: list

    def block(self, rows, cols):
        self.seen.append((rows.start, rows.stop, cols.start, cols.stop))
        return super().block(rows, cols)


@pytest.mark.parametrize(
    "backend", [n for n, c in BACKENDS.items() if issubclass(c, attn.BlockwiseBackend)]
)
def test_blockwise_bias_never_covers_more_than_a_block(backend):
    q, k, v, grid, pad = inputs(2, 4, 1000, 1)
    bias = _SpyBias.from_grid(grid, 4, 1)
    bias.seen = []
    if unavailable(backend):
        return  # its error is tested above; the spy needs the kernel to run
    with torch.no_grad():
        attend(backend, q, k, v, bias, pad, block_size=128)
    assert max(e - s for s, e, _, _ in bias.seen) == 128
    assert [s for s, *_ in bias.seen] == list(range(0, 1001, 128))  # rows covered once, in order
    assert {(c0, c1) for *_, c0, c1 in bias.seen} == {(0, 1001)}
    # and the block shrinks so that one block never exceeds MAX_BLOCK_ELEMENTS
    assert attn._block_rows(1024, 1, 16, 1_000_000) * 16 * 1_000_000 <= attn.MAX_BLOCK_ELEMENTS


@pytest.mark.parametrize("backend", backends())
def test_attend_with_lse(backend):
    q, k, v, _, pad = inputs(3, 2, 20, 0)
    pad[2] = True  # no real key at all
    if unavailable(backend):
        with pytest.raises((ValueError, ImportError)):
            get_backend(backend).check("cpu")
        return
    with torch.no_grad():
        out, lse = get_backend(backend).attend_with_lse(q, k, v, pad)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)
    for b in range(2):
        keys = ~pad[b]
        ref_lse = torch.logsumexp(scores[b][..., keys], -1)
        ref = torch.softmax(scores[b][..., keys], -1) @ v[b][:, keys].double()
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()


@pytest.mark.parametrize("bias", list(BIASES))
def test_bias_score_mod_equals_its_blocks(bias):
    """The two views of a bias agree: ``score_mod`` (FlexAttention) evaluated eagerly on every
    (b, h, q, kv) equals the ``block`` tiles (blockwise kernels), and tiles compose."""
    _, _, _, grid, _ = inputs(2, 4, 11, 2)
    b = make_bias(bias, grid, 4, 2)
    t = 13
    idx = torch.arange(t)
    mod = b.score_mod(
        torch.zeros(()),
        torch.arange(2)[:, None, None, None],
        torch.arange(4)[None, :, None, None],
        idx[None, None, :, None],
        idx[None, None, None, :],
    ).expand(2, 4, t, t)
    whole = b.block(slice(0, t), slice(0, t))
    whole = torch.zeros(2, 4, t, t) if whole is None else whole.expand(2, 4, t, t)
    torch.testing.assert_close(mod, whole, atol=1e-5, rtol=1e-6)
    tile = b.block(slice(3, 9), slice(1, 12))
    if tile is not None:
        torch.testing.assert_close(tile.expand(2, 4, 6, 11), whole[:, :, 3:9, 1:12])
    padded = b.padded(5).score_mod(torch.zeros(()), 1, 3, idx[:, None], idx[None, :])
    torch.testing.assert_close(padded.expand(t, t), mod[1, 3])


def test_unknown_and_unavailable_backends_explain_themselves():
    q, k, v, grid, pad = inputs(1, 2, 5, 0)
    with pytest.raises(ValueError, match="Unknown attention backend"):
        FullAttention("magic")
    with pytest.raises(ValueError, match="CUDA only"):
        attend("xformers", q, k, v)
    with pytest.raises(ValueError, match="inference only"):
        attend("flex", q.requires_grad_(), k, v)
