"""LongNet dilated attention against an explicit-loop oracle written from the definition.

Definition (issue 5, torchscale's non-causal DilatedAttention): per branch (w, r), w clipped to
N; consecutive segments of w tokens (the last may be shorter); heads split into r contiguous
groups of ceil(H/r); head group j keeps, in every segment, the tokens whose offset from the
segment start is ≡ j (mod r), and those queries attend exactly those (non-padded) keys; a
token's output mixes the branches that selected it with softmax weights of their log-sum-exp.

Parametrised over ``BACKENDS`` (see tests/test_attention.py): a new backend is run here too.
"""

import math

import numpy as np
import pytest
import torch

from slidefm.models.alibi import Alibi2DBias
from slidefm.models.attention import BACKENDS, get_backend
from slidefm.models.dilated import DilatedAttention

pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(q, k, v, segs, dils, pad=None):
    """Explicit loops in float64 over batch, branch, segment, head, query."""
    q, k, v = (x.double().numpy() for x in (q, k, v))
    bsz, n, heads, dh = q.shape
    pad = np.zeros((bsz, n), bool) if pad is None else pad.numpy()
    outs = np.zeros((bsz, n, heads, dh))
    for b in range(bsz):
        for h in range(heads):
            per_token = [[] for _ in range(n)]  # (lse, out) of each branch that selected it
            for w, r in zip(segs, dils):
                w = min(w, n)
                g = math.ceil(heads / r)
                j = h // g
                for start in range(0, n, w):
                    sel = [p for p in range(start, min(start + w, n)) if (p - start) % r == j]
                    keys = [p for p in sel if not pad[b, p]]
                    for p in sel:
                        if not keys:
                            continue
                        s = np.array([q[b, p, h] @ k[b, t, h] for t in keys]) / math.sqrt(dh)
                        lse = np.log(np.exp(s - s.max()).sum()) + s.max()
                        o = sum(np.exp(s[i] - lse) * v[b, t, h] for i, t in enumerate(keys))
                        per_token[p].append((lse, o))
            for p in range(n):
                if per_token[p]:
                    lses = np.array([x[0] for x in per_token[p]])
                    wts = np.exp(lses - lses.max())
                    wts /= wts.sum()
                    outs[b, p, h] = sum(wt * o for wt, (_, o) in zip(wts, per_token[p]))
    return torch.from_numpy(outs)


CASES = [  # (N, H, segment_lengths, dilation_ratios)
    (37, 5, [8, 16, 100], [1, 2, 4]),  # N not a multiple of w or r; H=5 not divisible by 2, 4
    (50, 4, [10, 25], [1, 3]),  # r = 3 does not divide w = 10 or 25: offsets per segment
    (23, 6, [7, 23], [2, 4]),  # w = 7 odd with r = 2: segment-relative parity flips
    (64, 8, [16, 32, 64], [1, 2, 4]),  # everything divides
    (19, 3, [4, 1024], [1, 8]),  # w clipped to N; r = 8 > H leaves head groups empty
]


def rand_qkv(n, heads, dh=8, bsz=2, seed=0):
    """q, k, v in the oracle's [B, N, H, Dh]; ``dilated`` transposes to the module's layout."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, n, heads, dh, generator=gen) for _ in range(3)]


def dilated(q, k, v, segs, dils, key_padding_mask=None, backend="naive", padding="masked"):
    """DilatedAttention on [B, N, H, Dh] tensors (the module takes [B, H, N, Dh])."""
    mod = DilatedAttention(segs, dils, backend, padding)
    out = mod(*(x.transpose(1, 2) for x in (q, k, v)), None, key_padding_mask)
    return out.transpose(1, 2)


def fast_backends(needs_grad: bool = False) -> list[str]:
    """Backends that run on this CPU without compiling (the others: see the tests below)."""
    out = []
    for name, cls in BACKENDS.items():
        try:
            get_backend(name).check("cpu", needs_grad)
        except (ValueError, ImportError):
            continue
        if not cls.compiled:
            out.append(name)
    return out


def test_unrunnable_backends_fail_clearly():
    q, k, v = rand_qkv(10, 2)
    for name in BACKENDS:
        for grad in (False, True):
            if name in fast_backends(grad) or (BACKENDS[name].compiled and not grad):
                continue
            leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
            with pytest.raises(
                (ValueError, ImportError), match="CUDA only|inference only|xformers"
            ):
                dilated(*leaves, [4], [1], backend=name)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, backend):
    n, heads, segs, dils = case
    q, k, v = rand_qkv(n, heads)
    got = dilated(q, k, v, segs, dils, backend=backend)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), oracle(q, k, v, segs, dils), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("case", CASES[:3])
def test_matches_oracle_with_padding(case, backend):
    n, heads, segs, dils = case
    q, k, v = rand_qkv(n, heads, seed=1)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, n - 9 :] = True  # a padded tail (whole segments of padding for small w)
    pad[1, ::5] = True  # scattered padding
    got = dilated(q, k, v, segs, dils, key_padding_mask=pad, backend=backend)
    ref = oracle(q, k, v, segs, dils, pad)
    real = ~pad
    torch.testing.assert_close(got.double()[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_single_dense_branch_is_plain_attention():
    q, k, v = rand_qkv(30, 4)
    got = dilated(q, k, v, [1000], [1])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", fast_backends(needs_grad=True))
def test_gradients_match_naive_and_are_finite(backend):
    n, heads, segs, dils = CASES[0]
    grads = {}
    for name in ("naive", backend):
        q, k, v = (x.requires_grad_() for x in rand_qkv(n, heads, seed=2))
        pad = torch.zeros(2, n, dtype=torch.bool)
        pad[0, 20:] = True
        out = dilated(q, k, v, segs, dils, key_padding_mask=pad, backend=name)
        (out[~pad] ** 2).sum().backward()
        grads[name] = [x.grad for x in (q, k, v)]
        assert all(torch.isfinite(g).all() for g in grads[name])
    for a, b in zip(grads["naive"], grads[backend]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rejects_mismatched_branches_a_bias_and_torchscale_padding_masks():
    with pytest.raises(ValueError, match="equal length"):
        DilatedAttention([4, 8], [1])
    with pytest.raises(ValueError, match="padding"):
        DilatedAttention([4], [1], padding="zeros")
    q, k, v = rand_qkv(10, 2)
    bias = Alibi2DBias.from_grid(torch.zeros(2, 10, 2), 2)
    with pytest.raises(ValueError, match="no position bias"):
        DilatedAttention([4], [1])(q, k, v, bias)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, -1] = True
    with pytest.raises(ValueError, match="torchscale"):
        dilated(q, k, v, [4], [1], pad, padding="torchscale")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [n for n, c in BACKENDS.items() if c.compiled])
def test_compiled_backend_matches_oracle_inference(backend):
    """FlexAttention (compiled; CPU: inference only) on the same definition."""
    n, heads, segs, dils = CASES[0]
    q, k, v = rand_qkv(n, heads)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, 30:] = True
    with torch.no_grad():
        got = dilated(q, k, v, segs, dils, key_padding_mask=pad, backend=backend)
    ref = oracle(q, k, v, segs, dils, pad)
    torch.testing.assert_close(got.double()[~pad], ref[~pad], atol=1e-5, rtol=1e-5)
