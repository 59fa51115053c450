"""LongNet dilated attention (Ding et al. 2023; Prov-GigaPath's slide encoder), non-causal.

For each branch (segment length w, dilation r):

* w is clipped to N; the sequence is cut into consecutive segments of w tokens, the last one
  possibly shorter (the fill up to w is never attended);
* the H heads are split into r contiguous groups of ceil(H/r) heads (the last groups may be
  short or empty);
* head group j keeps, in every segment, the tokens whose offset from the segment start is
  ≡ j (mod r) — "p mod r = j" with p counted from the segment start, which is what
  torchscale's ``DilatedAttention`` does (each segment is padded to a multiple of r on its
  own). It differs from counting p from the sequence start only when w is not a multiple of r;
* those queries attend exactly those keys (minus padded keys) with an exact softmax.

A token's output for a head is the mix of the branches that selected it, weighted by a
softmax over the branches' log-sum-exp normalisers (a branch that did not select it, or
whose keys are all padding, contributes nothing). As in torchscale, the weights are constants
in backward (gradients flow through each branch's attention output only).

Memory per branch is O(N · w / r) scores at most, in blocks: linear in N for fixed w.

``padding="torchscale"`` reproduces Prov-GigaPath's published LongNet (torchscale
``DilatedAttention`` on flash-attn) instead: the sequence is zero-padded to a multiple of w and
each segment to a multiple of r, and those zero rows *are* attended as keys (score 0, value 0)
— torchscale ignores the key padding mask. The segment outputs are laid end to end at the
padded segment length and cut to N, as torchscale does. Our default ``"masked"`` never attends
padding, so a slide's embedding does not depend on how its length falls on the segments; the
torchscale mode exists only to load published weights and give their numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slidefm.models.attention import _hi, attention_with_lse, check_backend

PADDING_MODES = ("masked", "torchscale")


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_ratios: Sequence[int],
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "naive",
    padding: str = "masked",
) -> torch.Tensor:
    """Dilated attention of q, k, v: [B, N, H, Dh] (no projections); returns [B, N, H, Dh].

    key_padding_mask: [B, N] bool, True = padded token (never attended). ``backend`` runs
    each segment's attention (see ``slidefm.models.attention``); ``naive`` is the oracle.
    ``padding``: ``"masked"`` (default) or ``"torchscale"`` (zero padding attended, as
    Prov-GigaPath; see the module docstring; no key_padding_mask then).
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding {padding!r}; choose one of {PADDING_MODES}")
    if padding == "torchscale" and key_padding_mask is not None and bool(key_padding_mask.any()):
        raise ValueError(
            "padding='torchscale' attends padding as zero keys (as torchscale does); embed "
            "slides one at a time instead of passing a key_padding_mask"
        )
    if len(segment_lengths) != len(dilation_ratios) or not segment_lengths:
        raise ValueError(
            f"segment_lengths {list(segment_lengths)} and dilation_ratios "
            f"{list(dilation_ratios)} must be non-empty and of equal length"
        )
    if any(w < 1 for w in segment_lengths) or any(r < 1 for r in dilation_ratios):
        raise ValueError("segment lengths and dilation ratios must be ≥ 1")
    check_backend(backend, q.device)
    if key_padding_mask is not None and not bool(key_padding_mask.any()):
        key_padding_mask = None
    acc = norm = run_max = None
    for w, r in zip(segment_lengths, dilation_ratios):
        if padding == "torchscale":
            out_b, lse_b = _branch_torchscale(q, k, v, int(w), int(r), backend)
        else:
            out_b, lse_b = _branch(q, k, v, int(w), int(r), key_padding_mask, backend)
        # Online softmax over branches: acc = Σ_b e^{lse_b − m} out_b, norm = Σ_b e^{lse_b − m}.
        if acc is None:
            run_max = lse_b
            safe = _finite_or_zero(run_max)
            c = torch.exp(lse_b - safe)
            acc, norm = _hi(out_b) * c[..., None], c
            continue
        new_max = torch.maximum(run_max, lse_b)
        safe = _finite_or_zero(new_max)
        a, c = torch.exp(run_max - safe), torch.exp(lse_b - safe)
        acc = acc * a[..., None] + _hi(out_b) * c[..., None]
        norm = norm * a + c
        run_max = new_max
    out = acc / norm.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    return out.to(v.dtype)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: int,
    r: int,
    key_padding_mask: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (w, r) branch: out [B, N, H, Dh] (0 where unselected), lse float32 [B, N, H]
    (−inf where unselected)."""
    bsz, n, heads, dh = q.shape
    w = min(w, n)
    n_seg = math.ceil(n / w)
    fill = n_seg * w - n  # tokens added to complete the last segment, never attended

    def segments(x: torch.Tensor) -> torch.Tensor:  # [B, N, H, Dh] -> [B, S, w, H, Dh]
        return F.pad(x, (0, 0, 0, 0, 0, fill)).view(bsz, n_seg, w, heads, dh)

    qs, ks, vs = segments(q), segments(k), segments(v)
    pad = None
    if fill or key_padding_mask is not None:
        padded = torch.zeros(bsz, n, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            padded = key_padding_mask.to(torch.bool)
        pad = F.pad(padded, (0, fill), value=True).view(bsz, n_seg, w)
    group = math.ceil(heads / r)
    out = q.new_zeros(bsz, n_seg, w, heads, dh)
    lse = q.new_full((bsz, n_seg, w, heads), float("-inf"), dtype=_hi(q[:0]).dtype)
    for j in range(min(r, w)):
        h0, h1 = j * group, min((j + 1) * group, heads)
        if h0 >= heads:
            break
        n_sel = len(range(j, w, r))

        def pick(x: torch.Tensor, j=j, h0=h0, h1=h1, n_sel=n_sel) -> torch.Tensor:
            # [B, S, w, H, Dh] -> [B·S, h1−h0, L, Dh]: offsets j, j+r, … of the group's heads
            sel = x[:, :, j::r, h0:h1].permute(0, 1, 3, 2, 4)
            return sel.reshape(bsz * n_seg, h1 - h0, n_sel, dh)

        mask = pad[:, :, j::r].reshape(bsz * n_seg, n_sel) if pad is not None else None
        o, o_lse = attention_with_lse(pick(qs), pick(ks), pick(vs), mask, backend)
        out[:, :, j::r, h0:h1] = o.view(bsz, n_seg, h1 - h0, n_sel, dh).permute(0, 1, 3, 2, 4)
        lse[:, :, j::r, h0:h1] = o_lse.view(bsz, n_seg, h1 - h0, n_sel).permute(0, 1, 3, 2)
    out = out.view(bsz, n_seg * w, heads, dh)[:, :n]
    return out, lse.view(bsz, n_seg * w, heads)[:, :n]


def _branch_torchscale(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (w, r) branch as torchscale computes it: zero padding attended (see module doc).

    Segments of w = min(w, N) tokens, the sequence zero-padded to S·w, each segment zero-padded
    to w' = ceil(w / r)·r; head group j keeps offsets j, j + r, … (w'/r tokens, padding
    included, never masked). Outputs are laid out as [S·w'] and cut to the first N, so for
    S > 1 and w % r ≠ 0 they shift exactly as torchscale's do.
    """
    bsz, n, heads, dh = q.shape
    w = min(w, n)
    n_seg = math.ceil(n / w)
    w_pad = math.ceil(w / r) * r

    def segments(x: torch.Tensor) -> torch.Tensor:  # [B, N, H, Dh] -> [B, S, w', H, Dh]
        x = F.pad(x, (0, 0, 0, 0, 0, n_seg * w - n)).view(bsz, n_seg, w, heads, dh)
        return F.pad(x, (0, 0, 0, 0, 0, w_pad - w))

    qs, ks, vs = segments(q), segments(k), segments(v)
    group = math.ceil(heads / r)
    n_sel = w_pad // r
    out = q.new_zeros(bsz, n_seg, w_pad, heads, dh)
    lse = q.new_full((bsz, n_seg, w_pad, heads), float("-inf"), dtype=_hi(q[:0]).dtype)
    for j in range(r):
        h0, h1 = j * group, min((j + 1) * group, heads)
        if h0 >= heads:
            break

        def pick(x: torch.Tensor, j=j, h0=h0, h1=h1) -> torch.Tensor:
            sel = x[:, :, j::r, h0:h1].permute(0, 1, 3, 2, 4)
            return sel.reshape(bsz * n_seg, h1 - h0, n_sel, dh)

        o, o_lse = attention_with_lse(pick(qs), pick(ks), pick(vs), None, backend)
        out[:, :, j::r, h0:h1] = o.view(bsz, n_seg, h1 - h0, n_sel, dh).permute(0, 1, 3, 2, 4)
        lse[:, :, j::r, h0:h1] = o_lse.view(bsz, n_seg, h1 - h0, n_sel).permute(0, 1, 3, 2)
    out = out.view(bsz, n_seg * w_pad, heads, dh)[:, :n]
    return out, lse.view(bsz, n_seg * w_pad, heads)[:, :n]
