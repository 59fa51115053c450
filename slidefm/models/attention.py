"""Full attention (``FullAttention``) on small backend classes behind one name → class table.

Layout everywhere: q, k, v [B, H, T, Dh] (torch SDPA layout); ``key_padding_mask`` [B, T]
bool, True = padded key; the position bias is an ``AttentionBias`` object
(``slidefm.models.bias``) that kernels ask for tiles (``bias.block``) or a FlexAttention
``score_mod``. A new backend is one ``AttentionBackend`` subclass in ``BACKENDS``, a new bias one
``AttentionBias`` subclass in ``BIASES``; the tests run every entry of both tables.

* ``naive`` materialises the [B, H, T, T] float32 scores (TITAN's behaviour): the oracle.
* ``sdpa`` / ``xformers`` build the bias for one block of query rows at a time and hand it to a
  fused kernel, so memory grows linearly in T (blocks are checkpointed under gradients).
* ``flex`` adds the bias inside FlexAttention's ``score_mod``, never as a tensor.

Each backend also gives masked attention with its float32 log-sum-exp normaliser
(``attend_with_lse``), which LongNet (``slidefm.models.dilated``) needs to mix its branches.
The bias and the normalisers are computed in float32 even under bf16/fp16 autocast (the bias
is then cast to the fused kernel's dtype); ``naive`` runs entirely in float32.

``flex`` on CPU: this torch compiles FlexAttention for CPU only for inference and without
``return_lse``, so on CPU it raises a clear error when gradients are needed (use ``sdpa``),
LongNet's normaliser is computed separately, and sequence lengths are bucketed (see
``_cpu_flex_length``). Measured: the compiled CPU kernel allocates an L×L float32 buffer, so
on CPU ``flex`` saves the bias but not quadratic memory; ``sdpa`` is the linear CPU path.
``xformers`` is GPU-only (optional extra).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slidefm.models.alibi import Alibi2DBias
from slidefm.models.bias import NO_BIAS, AttentionBias, NoBias

# Cap on the elements of one bias/score block: the query block shrinks below ``block_size``
# when B·H·T is large, so the transient block stays ≤ 128 MiB in float32 whatever the slide.
MAX_BLOCK_ELEMENTS = 2**25

Mask = torch.Tensor | None


def _hi(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for exactness checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _block_rows(block_size: int, bsz: int, heads: int, keys: int) -> int:
    """Query rows per block: ``block_size`` capped so one block has ≤ MAX_BLOCK_ELEMENTS."""
    return max(1, min(block_size, MAX_BLOCK_ELEMENTS // max(1, bsz * heads * keys)))


def _safe_keys(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """A batch element with no real key gets all keys unmasked, so kernels never see an
    all −inf row (NaN); callers zero or ignore those outputs."""
    return key_padding_mask & key_padding_mask.logical_not().any(-1, keepdim=True)


def _additive_tile(
    bias: AttentionBias, rows: slice, total: int, mask: Mask, like: torch.Tensor
) -> torch.Tensor | None:
    """Bias rows × all T keys with padded keys at −inf, float32 cast to ``like``'s dtype; None
    when there is neither a bias nor a mask. mask: [B, T] (already ``_safe_keys``)."""
    tile = bias.block(rows, slice(0, total))
    if tile is None:
        if mask is None:
            return None
        tile = torch.zeros(mask.shape[0], 1, rows.stop - rows.start, total, device=like.device)
    if mask is not None:
        tile = tile.masked_fill(mask[:, None, None, :], float("-inf"))
    return tile.to(like.dtype)


# ------------------------------------------------------------------------------------ backends


class AttentionBackend:
    """One way of computing attention; stateless, so one instance serves every call."""

    name: ClassVar[str]
    compiled: ClassVar[bool] = False  # first call compiles (slow on CPU: tests mark it slow)

    def check(self, device: torch.device | str | None = None, needs_grad: bool = False) -> None:
        """Fail early, with what to do, when this backend cannot run there (ValueError)."""

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: AttentionBias,
        key_padding_mask: Mask,
        block_size: int,
    ) -> torch.Tensor:
        """Non-causal attention [B, H, T, Dh] of q, k, v [B, H, T, Dh] with ``bias``."""
        raise NotImplementedError

    def attend_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked attention (no bias) and its float32 log-sum-exp normaliser.

        Returns out [B, H, L, Dh] and lse [B, H, L] (natural log; −inf and out = 0 where no
        key is real). The normaliser has no gradient: LongNet (and torchscale) treat the
        branch weights derived from it as constants in backward.
        """
        safe = _safe_keys(key_padding_mask) if key_padding_mask is not None else None
        out, lse = self._out_and_lse(q, k, v, key_padding_mask, safe)
        if lse is None:
            lse = lse_blockwise(q, k, key_padding_mask)
        lse = lse.detach()
        if key_padding_mask is not None:  # no real key at all: lse −inf and zero output
            empty = key_padding_mask.all(-1)[:, None, None]
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty[..., None], 0.0)
        return out, lse

    def _out_and_lse(self, q, k, v, key_padding_mask: Mask, safe: Mask):
        """(out, lse or None = compute it blockwise) of masked attention; safe = _safe_keys."""
        raise NotImplementedError


class NaiveBackend(AttentionBackend):
    """Materialised float32 scores + bias: O(T²) memory, the reference for every other one."""

    name = "naive"

    def attend(self, q, k, v, bias, key_padding_mask, block_size):
        with torch.autocast(q.device.type, enabled=False):
            scores = self._scores(q, k)
            whole = slice(0, q.shape[2])
            tile = bias.block(whole, whole)
            if tile is not None:
                scores = scores + tile
            if key_padding_mask is not None:
                pad = _safe_keys(key_padding_mask)[:, None, None, :]
                scores = scores.masked_fill(pad, float("-inf"))
            return torch.matmul(scores.softmax(-1), _hi(v)).to(v.dtype)

    def attend_with_lse(self, q, k, v, key_padding_mask):
        with torch.autocast(q.device.type, enabled=False):
            scores = self._scores(q, k)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
            return torch.matmul(probs, _hi(v)).to(v.dtype), lse.detach()

    @staticmethod
    def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(_hi(q), _hi(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])


class BlockwiseBackend(AttentionBackend):
    """A fused kernel run on blocks of query rows, each with its own bias tile; under gradients
    each block is checkpointed, so its tile is rebuilt in backward instead of being stored
    (training memory stays linear in T too)."""

    # The kernel is memory-efficient by itself when there is no bias tile to build.
    unblocked_without_bias: ClassVar[bool] = False

    def kernel(
        self, q_blk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, rows: slice, mask: Mask
    ) -> torch.Tensor:
        """Attention of the query rows ``rows`` (q_blk) over all keys; mask = _safe_keys."""
        raise NotImplementedError

    def attend(self, q, k, v, bias, key_padding_mask, block_size):
        bsz, heads, total, _ = q.shape
        mask = _safe_keys(key_padding_mask) if key_padding_mask is not None else None
        rows = _block_rows(block_size, bsz, heads, total)
        if bias.zero and self.unblocked_without_bias:
            rows = total
        if rows >= total:
            return self.kernel(q, k, v, bias, slice(0, total), mask)
        if not _needs_grad(q, k, v):
            return self._attend_into(q, k, v, bias, mask, rows)
        outs = []
        for s in range(0, total, rows):
            args = (q[:, :, s : s + rows], k, v, bias, slice(s, min(total, s + rows)), mask)
            outs.append(checkpoint(self.kernel, *args, use_reentrant=False))
        return torch.cat(outs, dim=2)

    def _attend_into(self, q, k, v, bias, mask: Mask, rows: int) -> torch.Tensor:
        """Inference: every block is copied into one preallocated output. Keeping the blocks'
        outputs alive until a final ``cat`` pinned the heap between the blocks' transient
        tiles, so glibc could never reuse them: +11 MB resident per block, 5.3 GB instead of
        2.2 GB for one TITAN layer at 32k tokens on 2 threads."""
        total = q.shape[2]
        out = None
        for s in range(0, total, rows):
            e = min(total, s + rows)
            blk = self.kernel(q[:, :, s:e], k, v, bias, slice(s, e), mask)
            if out is None:
                out = blk.new_empty(*blk.shape[:2], total, blk.shape[3])
            out[:, :, s:e] = blk
            del blk
        return out

    def _out_and_lse(self, q, k, v, key_padding_mask, safe):
        return self.kernel(q, k, v, NO_BIAS, slice(0, q.shape[2]), safe), None


class SdpaBackend(BlockwiseBackend):
    """torch's ``scaled_dot_product_attention``: the linear-memory path on CPU and GPU."""

    name = "sdpa"
    unblocked_without_bias = True

    def kernel(self, q_blk, k, v, bias, rows, mask):
        if bias.zero:  # a bool mask (or none) keeps SDPA's fast kernels
            attn_mask = mask.logical_not()[:, None, None, :] if mask is not None else None
        else:
            attn_mask = _additive_tile(bias, rows, k.shape[2], mask, q_blk)
        return F.scaled_dot_product_attention(q_blk, k, v, attn_mask=attn_mask)


class XformersBackend(BlockwiseBackend):
    """xformers' ``memory_efficient_attention`` (optional GPU extra, never needed on CPU)."""

    name = "xformers"

    def check(self, device=None, needs_grad=False):
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError(
                "attention backend 'xformers' runs on CUDA only; use backend 'sdpa' on CPU"
            )
        _xformers_ops()

    def kernel(self, q_blk, k, v, bias, rows, mask):
        tile = _additive_tile(bias, rows, k.shape[2], mask, q_blk)
        if tile is not None:  # xformers wants the key dim of the bias 8-aligned: pad, slice
            t = k.shape[2]
            full = tile.new_zeros(tile.shape[0], k.shape[1], tile.shape[2], (t + 7) // 8 * 8)
            full[..., :t] = tile
            tile = full[..., :t]
        out = _xformers_ops().memory_efficient_attention(
            q_blk.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=tile
        )
        return out.transpose(1, 2)


class FlexBackend(AttentionBackend):
    """Compiled FlexAttention with the bias (``bias.score_mod``) and padding per score."""

    name = "flex"
    compiled = True

    def check(self, device=None, needs_grad=False):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"attention backend 'flex' needs FlexAttention (torch ≥ 2.5; this is "
                f"{torch.__version__}); use backend 'sdpa'"
            ) from e
        if needs_grad and device is not None and torch.device(device).type == "cpu":
            raise ValueError(
                "attention backend 'flex' on CPU supports inference only (torch.compile's CPU "
                "FlexAttention has no backward); train with backend 'sdpa', or run flex on CUDA"
            )

    def attend(self, q, k, v, bias, key_padding_mask, block_size):
        return self._run(q, k, v, bias, key_padding_mask)[0]

    def _out_and_lse(self, q, k, v, key_padding_mask, safe):
        return self._run(q, k, v, NO_BIAS, key_padding_mask, return_lse=True)

    def _run(self, q, k, v, bias: AttentionBias, key_padding_mask: Mask, return_lse=False):
        self.check(q.device, _needs_grad(q, k, v))
        total = q.shape[2]
        cpu = q.device.type == "cpu"
        extra = _cpu_flex_length(total) - total if cpu else 0
        if extra:  # see _cpu_flex_length: pad, mask the extra keys, slice the extra queries off
            q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
            if key_padding_mask is None:
                key_padding_mask = torch.zeros(q.shape[0], total, dtype=torch.bool, device=q.device)
            key_padding_mask = F.pad(key_padding_mask, (0, extra), value=True)
            bias = bias.padded(extra)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        pad = _safe_keys(key_padding_mask).contiguous() if key_padding_mask is not None else None
        if cpu:  # a symbolic sequence length hits the codegen bug: keep it static per bucket
            for t in (q, k, v):
                torch._dynamo.mark_static(t, 2)
            for t in (*((pad,) if pad is not None else ()), *bias.static_tensors()):
                torch._dynamo.mark_static(t, 1)
        score_mod = _with_key_padding(bias.score_mod, pad)
        if return_lse and not cpu:
            out, lse = _compiled_flex(False)(q, k, v, score_mod=score_mod, return_lse=True)
            return out, lse.float()
        return _compiled_flex(cpu)(q, k, v, score_mod=score_mod)[:, :, :total], None


def _with_key_padding(score_mod, pad: Mask):
    if pad is None:
        return score_mod

    def masked(score, b, h, q_idx, kv_idx):
        return torch.where(pad[b, kv_idx], float("-inf"), score_mod(score, b, h, q_idx, kv_idx))

    return masked


def _cpu_flex_length(total: int) -> int:
    """Sequence length FlexAttention runs at on CPU: ``total`` rounded up to a bucket.

    torch 2.14's CPU FlexAttention C++ codegen fails ("cur_kvSplitSize4 was not declared")
    once the sequence length becomes a symbolic (dynamic) size, and on some lengths that are
    not a multiple of 64. So lengths stay static and are rounded up to multiples of 64 with
    four buckets per octave (≤ 25 % extra length): one ~10-30 s compile per bucket.
    """
    step = max(64, 1 << max(0, (total - 1).bit_length() - 3))
    return -(-total // step) * step


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError as e:  # optional extra
        raise ImportError(
            "attention backend 'xformers' needs xformers (GPU only): pip install 'slidefm[gpu]', "
            "or use backend 'sdpa'"
        ) from e
    return xops


@functools.cache
def _compiled_flex(static: bool):
    """Compiled FlexAttention; ``static`` (CPU): never symbolic shapes, whatever dynamo saw
    before in this process (a recompile otherwise turns sizes and ints dynamic, which hits the
    CPU codegen bug of ``_cpu_flex_length``; lengths are bucketed there)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False if static else None)


BACKENDS: dict[str, type[AttentionBackend]] = {
    b.name: b for b in (NaiveBackend, SdpaBackend, FlexBackend, XformersBackend)
}
BIASES: dict[str, type[AttentionBias]] = {b.name: b for b in (NoBias, Alibi2DBias)}


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name`` (see ``BACKENDS``)."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {tuple(BACKENDS)}")
    return BACKENDS[name]()


@torch.no_grad()
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def lse_blockwise(q: torch.Tensor, k: torch.Tensor, key_padding_mask: Mask = None) -> torch.Tensor:
    """log Σ_j exp(q·k_j/√Dh) over real keys, float32 [B, H, L], one query block at a time."""
    bsz, heads, n_q, dh = q.shape
    rows = _block_rows(n_q, bsz, heads, k.shape[2])
    kf = _hi(k).transpose(-1, -2)
    out = []
    for s in range(0, n_q, rows):
        scores = torch.matmul(_hi(q[:, :, s : s + rows]), kf) / math.sqrt(dh)
        if key_padding_mask is not None:
            scores.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
        out.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(out, dim=2)


# ---------------------------------------------------------------------------------- the module


class AttentionModule(nn.Module):
    """What ``FullAttention`` and ``DilatedAttention`` share: one forward signature and layout.
    No parameters: the q/k/v projections stay in the block, so state-dict keys do not depend
    on the variant or the backend."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = get_backend(backend)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: AttentionBias | None = None,
        key_padding_mask: Mask = None,
    ) -> torch.Tensor:
        """q, k, v [B, H, T, Dh]; bias over the T tokens (None = no bias); key_padding_mask
        [B, T] bool, True = padded token (never attended). Returns [B, H, T, Dh]."""
        self.backend.check(q.device, _needs_grad(q, k, v))
        return self.attend(q, k, v, NO_BIAS if bias is None else bias, key_padding_mask)

    def attend(self, q, k, v, bias: AttentionBias, key_padding_mask: Mask) -> torch.Tensor:
        raise NotImplementedError


class FullAttention(AttentionModule):
    """Every token attends every token (TITAN's 2D-ALiBi transformer)."""

    def __init__(self, backend: str = "sdpa", block_size: int = 1024):
        super().__init__(backend)
        self.block_size = block_size  # query rows per bias block (blockwise backends)

    def attend(self, q, k, v, bias, key_padding_mask):
        return self.backend.attend(q, k, v, bias, key_padding_mask, self.block_size)

    def extra_repr(self) -> str:
        return f"backend={self.backend.name}, block_size={self.block_size}"
