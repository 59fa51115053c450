"""``DilatedAttention``: LongNet dilated attention (Ding et al. 2023; Prov-GigaPath's slide encoder), non-causal.

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

Memory per branch is O(N · w / r) scores at most, in blocks: linear in N for fixed w. Tensors
are [B, H, N, Dh] as in ``FullAttention``; the segment/offset gather and scatter are einops
rearranges, and each (segment, head group, offset) attention runs on any backend of
``slidefm.models.attention.BACKENDS``.

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
from einops import rearrange

from slidefm.models.attention import AttentionModule, Mask, _hi

PADDING_MODES = ("masked", "torchscale")


class DilatedAttention(AttentionModule):
    """LongNet attention over branches (segment length w, dilation r); see the module docstring.

    No parameters (projections stay in the block). ``backend`` runs each segment's attention
    (``naive`` is the oracle); ``padding``: ``"masked"`` (default) or ``"torchscale"``
    (zero padding attended, as Prov-GigaPath; no key_padding_mask then).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_ratios: Sequence[int],
        backend: str = "sdpa",
        padding: str = "masked",
    ):
        super().__init__(backend)
        if padding not in PADDING_MODES:
            raise ValueError(f"padding {padding!r}; choose one of {PADDING_MODES}")
        if len(segment_lengths) != len(dilation_ratios) or not segment_lengths:
            raise ValueError(
                f"segment_lengths {list(segment_lengths)} and dilation_ratios "
                f"{list(dilation_ratios)} must be non-empty and of equal length"
            )
        if any(w < 1 for w in segment_lengths) or any(r < 1 for r in dilation_ratios):
            raise ValueError("segment lengths and dilation ratios must be ≥ 1")
        self.branches = [(int(w), int(r)) for w, r in zip(segment_lengths, dilation_ratios)]
        self.padding = padding

    def extra_repr(self) -> str:
        return f"branches={self.branches}, backend={self.backend.name}, padding={self.padding}"

    def attend(self, q, k, v, bias, key_padding_mask):
        """LongNet has no position bias (``bias`` must be the zero bias); padded tokens are
        never attended (``masked``) or rejected (``torchscale``)."""
        if not bias.zero:
            raise ValueError(
                f"dilated attention takes no position bias (got {bias.name!r}); add positions "
                "to the tokens instead (sincos2d, as Prov-GigaPath)"
            )
        if key_padding_mask is not None and not bool(key_padding_mask.any()):
            key_padding_mask = None
        if self.padding == "torchscale" and key_padding_mask is not None:
            raise ValueError(
                "padding='torchscale' attends padding as zero keys (as torchscale does); embed "
                "slides one at a time instead of passing a key_padding_mask"
            )
        acc = norm = run_max = None
        for w, r in self.branches:
            out_b, lse_b = self._branch(q, k, v, w, r, key_padding_mask)
            # Online softmax over branches: acc = Σ_b e^{lse_b − m} out_b, norm = Σ_b e^{lse_b − m}.
            if acc is None:
                run_max = lse_b
                c = torch.exp(lse_b - _finite_or_zero(run_max))
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

    def _branch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One (w, r) branch: out [B, H, N, Dh] (0 where unselected), lse float32 [B, H, N]
        (−inf where unselected).

        Segments of w = min(w, N) tokens, the sequence padded to S·w and each segment to
        w' = ceil(w / r)·r, so that offset j of every segment is one einops axis. ``masked``:
        head group j attends the len(range(j, w, r)) real offsets (padding masked);
        ``torchscale``: all w'/r, zero padding included, and the outputs are laid out as
        [S·w'] and cut to the first N, so for S > 1 and w % r ≠ 0 they shift exactly as
        torchscale's do.
        """
        bsz, heads, n, dh = q.shape
        torchscale = self.padding == "torchscale"
        w = min(w, n)
        n_seg = math.ceil(n / w)
        w_pad = math.ceil(w / r) * r
        # Token-major [B, N, H, Dh] segments: each head group's pick below is then a view.
        qs, ks, vs = (_segments(rearrange(x, "b h n d -> b n h d"), w, r) for x in (q, k, v))
        pads = None
        if not torchscale and (mask is not None or n_seg * w > n):
            pad = (
                mask if mask is not None else torch.zeros(bsz, n, dtype=torch.bool, device=q.device)
            )
            pads = _segments(pad, w, r, fill=True)  # [r, B, S, w'/r], True = pad
        out = q.new_zeros(r, bsz, n_seg, w_pad // r, heads, dh)
        lse = q.new_full(out.shape[:-1], float("-inf"), dtype=_hi(q[:0]).dtype)
        group = math.ceil(heads / r)
        for j in range(r):
            h0, h1 = j * group, min((j + 1) * group, heads)
            n_sel = w_pad // r if torchscale else len(range(j, w, r))
            if h0 >= heads or n_sel == 0:
                break

            def pick(x: torch.Tensor, j=j, h0=h0, h1=h1, n_sel=n_sel) -> torch.Tensor:
                # [r, B, S, L, H, Dh] -> [B·S, h1−h0, n_sel, Dh]: offsets j, j+r, … of the group
                return rearrange(x[j, :, :, :n_sel, h0:h1], "b s l h d -> (b s) h l d")

            m = rearrange(pads[j, :, :, :n_sel], "b s l -> (b s) l") if pads is not None else None
            o, o_lse = self.backend.attend_with_lse(pick(qs), pick(ks), pick(vs), m)
            out[j, :, :, :n_sel, h0:h1] = rearrange(o, "(b s) h l d -> b s l h d", b=bsz)
            lse[j, :, :, :n_sel, h0:h1] = rearrange(o_lse, "(b s) h l -> b s l h", b=bsz)
        out = rearrange(out, "r b s l h d -> b h s (l r) d")
        lse = rearrange(lse, "r b s l h -> b h s (l r)")
        if not torchscale:  # drop each segment's fill: positions are s·w + p
            out, lse = out[:, :, :, :w], lse[:, :, :, :w]
        out = rearrange(out, "b h s w d -> b h (s w) d")[:, :, :n]
        return out, rearrange(lse, "b h s w -> b h (s w)")[:, :, :n]


def _segments(x: torch.Tensor, w: int, r: int, fill: float | bool = 0.0) -> torch.Tensor:
    """[B, N, …] → [r, B, S, ceil(w/r), …]: x cut into S = ceil(N/w) segments of w tokens, each
    padded to ceil(w/r)·r with ``fill``; index [j, :, :, l] = segment offset l·r + j."""
    n = x.shape[1]
    n_seg = math.ceil(n / w)
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, n_seg * w - n), value=fill)
    x = rearrange(x, "b (s w) ... -> b s w ...", w=w)
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, math.ceil(w / r) * r - w), value=fill)
    return rearrange(x, "b s (l r) ... -> r b s l ...", r=r)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
