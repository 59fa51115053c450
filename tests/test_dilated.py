"""LongNet dilated attention against an explicit-loop oracle written from the definition.

Definition (issue 5, torchscale's non-causal DilatedAttention): per branch (w, r), w clipped to
N; consecutive segments of w tokens (the last may be shorter); heads split into r contiguous
groups of ceil(H/r); head group j keeps, in every segment, the tokens whose offset from the
segment start is ≡ j (mod r), and those queries attend exactly those (non-padded) keys; a
token's output mixes the branches that selected it with softmax weights of their log-sum-exp.
"""

import math

import numpy as np
import pytest
import torch

from slidefm.models.dilated import dilated_attention

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
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, n, heads, dh, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, backend):
    n, heads, segs, dils = case
    q, k, v = rand_qkv(n, heads)
    got = dilated_attention(q, k, v, segs, dils, backend=backend)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), oracle(q, k, v, segs, dils), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("case", CASES[:3])
def test_matches_oracle_with_padding(case, backend):
    n, heads, segs, dils = case
    q, k, v = rand_qkv(n, heads, seed=1)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, n - 9 :] = True  # a padded tail (whole segments of padding for small w)
    pad[1, ::5] = True  # scattered padding
    got = dilated_attention(q, k, v, segs, dils, key_padding_mask=pad, backend=backend)
    ref = oracle(q, k, v, segs, dils, pad)
    real = ~pad
    torch.testing.assert_close(got.double()[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_single_dense_branch_is_plain_attention():
    q, k, v = rand_qkv(30, 4)
    got = dilated_attention(q, k, v, [1000], [1])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_between_backends_and_are_finite():
    n, heads, segs, dils = CASES[0]
    grads = {}
    for backend in ("naive", "sdpa"):
        q, k, v = (x.requires_grad_() for x in rand_qkv(n, heads, seed=2))
        pad = torch.zeros(2, n, dtype=torch.bool)
        pad[0, 20:] = True
        out = dilated_attention(q, k, v, segs, dils, key_padding_mask=pad, backend=backend)
        (out[~pad] ** 2).sum().backward()
        grads[backend] = [x.grad for x in (q, k, v)]
        assert all(torch.isfinite(g).all() for g in grads[backend])
    for a, b in zip(grads["naive"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rejects_mismatched_branches():
    q, k, v = rand_qkv(10, 2)
    with pytest.raises(ValueError, match="equal length"):
        dilated_attention(q, k, v, [4, 8], [1])


@pytest.mark.slow
def test_flex_matches_oracle_inference():
    """FlexAttention (compiled; CPU: inference only) on the same definition."""
    n, heads, segs, dils = CASES[0]
    q, k, v = rand_qkv(n, heads)
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, 30:] = True
    with torch.no_grad():
        got = dilated_attention(q, k, v, segs, dils, key_padding_mask=pad, backend="flex")
    ref = oracle(q, k, v, segs, dils, pad)
    torch.testing.assert_close(got.double()[~pad], ref[~pad], atol=1e-5, rtol=1e-5)
