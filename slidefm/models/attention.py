"""Attention backends behind one call signature: ``naive`` (the oracle), ``sdpa``, ``flex``, ``xformers``.

Two entry points share the backends:

* ``full_attention`` — every token attends every token, optionally with the 2D ALiBi bias.
  ``naive`` materialises the [B, H, T, T] scores (TITAN's behaviour, the test oracle);
  ``sdpa`` and ``xformers`` build the bias for one block of queries at a time and hand it to a
  fused kernel, so memory grows linearly in T; ``flex`` computes the bias inside FlexAttention's
  ``score_mod`` from the grid, never as a tensor.
* ``attention_with_lse`` — plain masked attention that also returns the softmax normaliser
  (log-sum-exp), which LongNet needs to mix its branches.

Tensors are [B, H, T, Dh] (torch SDPA layout); ``key_padding_mask`` is bool, True = padded key.
The ALiBi bias and the normalisers are computed in float32 even under bf16/fp16 autocast (the
bias is then cast to the fused kernel's dtype); ``naive`` runs entirely in float32.

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

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slidefm.models.alibi import alibi_2d_bias_block

BACKENDS = ("naive", "sdpa", "flex", "xformers")
# Cap on the elements of one bias/score block: the query block shrinks below ``block_size``
# when B·H·T is large, so the transient block stays ≤ 128 MiB in float32 whatever the slide.
MAX_BLOCK_ELEMENTS = 2**25


def check_backend(backend: str, device: torch.device | str | None = None) -> None:
    """Fail early, with what to do, when ``backend`` cannot run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {BACKENDS}")
    dev = torch.device(device) if device is not None else None
    if backend == "xformers":
        if dev is not None and dev.type != "cuda":
            raise ValueError(
                "attention backend 'xformers' runs on CUDA only; use backend 'sdpa' on CPU"
            )
        _xformers_ops()


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
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _hi(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for exactness checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.device.type == "cpu" and _needs_grad(q, k, v):
        raise ValueError(
            "attention backend 'flex' on CPU supports inference only (torch.compile's CPU "
            "FlexAttention has no backward); train with backend 'sdpa', or run flex on CUDA"
        )


def _block_rows(block_size: int, bsz: int, heads: int, keys: int) -> int:
    """Query rows per block: ``block_size`` capped so one block has ≤ MAX_BLOCK_ELEMENTS."""
    return max(1, min(block_size, MAX_BLOCK_ELEMENTS // max(1, bsz * heads * keys)))


def _safe_keys(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """A batch element with no real key gets all keys unmasked, so kernels never see an
    all −inf row (NaN); callers zero or ignore those outputs."""
    return key_padding_mask & key_padding_mask.logical_not().any(-1, keepdim=True)


# ----------------------------------------------------------------------------- full attention


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    *,
    grid: torch.Tensor | None = None,
    slopes: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """Non-causal attention of T = P + N tokens, optionally with 2D ALiBi.

    q, k, v: [B, H, T, Dh]; grid: [B, N, 2] (col, row) cells of the N tiles, needed with
    ``slopes`` [H] (ALiBi on; None = no bias); key_padding_mask: [B, T] bool, True = pad.
    ``block_size``: query rows per bias block (``sdpa``/``xformers``). Returns [B, H, T, Dh].
    """
    if slopes is not None and grid is None:
        raise ValueError("ALiBi attention needs the tile grid")
    if backend == "naive":
        return _naive_full(q, k, v, grid, slopes, num_prefix_tokens, key_padding_mask)
    if backend == "sdpa":
        return _blockwise_full(
            q, k, v, grid, slopes, num_prefix_tokens, key_padding_mask, block_size, _sdpa_block
        )
    if backend == "xformers":
        check_backend("xformers", q.device)
        return _blockwise_full(
            q, k, v, grid, slopes, num_prefix_tokens, key_padding_mask, block_size, _xformers_block
        )
    if backend == "flex":
        return _flex(q, k, v, grid, slopes, num_prefix_tokens, key_padding_mask)[0]
    check_backend(backend)
    raise AssertionError  # unreachable: check_backend raised


def _naive_full(q, k, v, grid, slopes, n_prefix, key_padding_mask):
    """Materialised float32 scores + bias: O(T²) memory, the reference for every other backend."""
    with torch.autocast(q.device.type, enabled=False):
        return _naive_full_fp32(q, k, v, grid, slopes, n_prefix, key_padding_mask)


def _naive_full_fp32(q, k, v, grid, slopes, n_prefix, key_padding_mask):
    scores = torch.matmul(_hi(q), _hi(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if slopes is not None:
        scores = scores + alibi_2d_bias_block(grid, slopes, 0, q.shape[2], n_prefix)
    if key_padding_mask is not None:
        scores = scores.masked_fill(_safe_keys(key_padding_mask)[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1), _hi(v)).to(v.dtype)


def _block_bias(grid, slopes, s, e, n_prefix, key_padding_mask, shape, dtype):
    """float32 bias rows [s, e) (ALiBi and/or padding) cast to the kernel's dtype, or None."""
    if slopes is not None:
        return alibi_2d_bias_block(grid, slopes, s, e, n_prefix, key_padding_mask).to(dtype)
    if key_padding_mask is None:
        return None
    bias = torch.zeros(shape[0], 1, e - s, shape[2], dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))


def _sdpa_block(q_blk, k, v, grid, slopes, s, e, n_prefix, key_padding_mask):
    if slopes is None and key_padding_mask is not None:  # a bool mask keeps SDPA's fast kernels
        return F.scaled_dot_product_attention(
            q_blk, k, v, attn_mask=key_padding_mask.logical_not()[:, None, None, :]
        )
    bias = _block_bias(grid, slopes, s, e, n_prefix, key_padding_mask, k.shape, q_blk.dtype)
    return F.scaled_dot_product_attention(q_blk, k, v, attn_mask=bias)


def _xformers_block(q_blk, k, v, grid, slopes, s, e, n_prefix, key_padding_mask):
    xops = _xformers_ops()
    bias = _block_bias(grid, slopes, s, e, n_prefix, key_padding_mask, k.shape, q_blk.dtype)
    if bias is not None:  # xformers wants the key dim of the bias 8-aligned: pad, then slice
        t = k.shape[2]
        t8 = (t + 7) // 8 * 8
        full = bias.new_zeros(bias.shape[0], k.shape[1], bias.shape[2], t8)
        full[..., :t] = bias
        bias = full[..., :t]
    out = xops.memory_efficient_attention(
        q_blk.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


def _blockwise_full(q, k, v, grid, slopes, n_prefix, key_padding_mask, block_size, kernel):
    """Run ``kernel`` on query blocks; with gradients each block is checkpointed, so its bias is
    rebuilt in backward instead of being stored (training memory stays linear in T too)."""
    bsz, heads, total, _ = q.shape
    if key_padding_mask is not None:
        key_padding_mask = _safe_keys(key_padding_mask)
    rows = _block_rows(block_size, bsz, heads, total)
    if slopes is None and kernel is _sdpa_block:
        rows = total  # no bias tensor: SDPA's own kernel is already memory-efficient
    outs = []
    for s in range(0, total, rows):
        e = min(total, s + rows)
        args = (q[:, :, s:e], k, v, grid, slopes, s, e, n_prefix, key_padding_mask)
        if rows < total and _needs_grad(q, k, v):
            outs.append(checkpoint(kernel, *args, use_reentrant=False))
        else:
            outs.append(kernel(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _cpu_flex_length(total: int) -> int:
    """Sequence length FlexAttention runs at on CPU: ``total`` rounded up to a bucket.

    torch 2.14's CPU FlexAttention C++ codegen fails ("cur_kvSplitSize4 was not declared")
    once the sequence length becomes a symbolic (dynamic) size, and on some lengths that are
    not a multiple of 64. So lengths stay static and are rounded up to multiples of 64 with
    four buckets per octave (≤ 25 % extra length): one ~10-30 s compile per bucket.
    """
    step = max(64, 1 << max(0, (total - 1).bit_length() - 3))
    return -(-total // step) * step


def _flex(q, k, v, grid, slopes, n_prefix, key_padding_mask, return_lse=False):
    """FlexAttention with the ALiBi bias and padding computed per score inside ``score_mod``."""
    _check_flex(q, k, v)
    total = q.shape[2]
    cpu = q.device.type == "cpu"
    extra = _cpu_flex_length(total) - total if cpu else 0
    if extra:  # see _cpu_flex_length: pad, mask the extra keys, slice the extra queries off
        q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(q.shape[0], total, dtype=torch.bool, device=q.device)
        key_padding_mask = F.pad(key_padding_mask, (0, extra), value=True)
        if grid is not None:
            grid = F.pad(grid, (0, 0, 0, extra))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pad = _safe_keys(key_padding_mask).contiguous() if key_padding_mask is not None else None
    if slopes is not None:
        g = grid.to(torch.float32)
        gx, gy = g[..., 0].contiguous(), g[..., 1].contiguous()
        sl = slopes.to(device=q.device, dtype=torch.float32)
    if cpu:  # a symbolic sequence length hits the codegen bug: keep it static per bucket
        for t in (q, k, v):
            torch._dynamo.mark_static(t, 2)
        for t in (pad, *((gx, gy) if slopes is not None else ())):
            if t is not None:
                torch._dynamo.mark_static(t, 1)

    def score_mod(score, b, h, q_idx, kv_idx):
        if slopes is not None:
            qt = (q_idx - n_prefix).clamp(min=0)
            kt = (kv_idx - n_prefix).clamp(min=0)
            dx = gx[b, qt] - gx[b, kt]
            dy = gy[b, qt] - gy[b, kt]
            tile = (q_idx >= n_prefix) & (kv_idx >= n_prefix)
            score = score - torch.where(tile, sl[h] * torch.sqrt(dx * dx + dy * dy), 0.0)
        if pad is not None:
            score = torch.where(pad[b, kv_idx], float("-inf"), score)
        return score

    fa = _compiled_flex()
    if return_lse and q.device.type != "cpu":
        out, lse = fa(q, k, v, score_mod=score_mod, return_lse=True)
        return out, lse.float()
    out = fa(q, k, v, score_mod=score_mod)
    return out[:, :, :total], None


# ------------------------------------------------------------- attention with normaliser (LongNet)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention and its float32 log-sum-exp normaliser.

    q, k, v: [B, H, L, Dh]; key_padding_mask: [B, L] bool, True = pad. Returns out
    [B, H, L, Dh] and lse [B, H, L] (natural log; −inf and out = 0 where no key is real).
    The normaliser is returned without gradient: LongNet (and torchscale) treat the branch
    weights derived from it as constants in backward.
    """
    if backend == "naive":
        with torch.autocast(q.device.type, enabled=False):
            return _naive_with_lse(q, k, v, key_padding_mask)
    safe = _safe_keys(key_padding_mask) if key_padding_mask is not None else None
    if backend == "sdpa":
        mask = safe.logical_not()[:, None, None, :] if safe is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        lse = None
    elif backend == "flex":
        out, lse = _flex(q, k, v, None, None, 0, key_padding_mask, return_lse=True)
    elif backend == "xformers":
        check_backend("xformers", q.device)
        out = _xformers_block(q, k, v, None, None, 0, q.shape[2], 0, safe)
        lse = None
    else:
        check_backend(backend)
        raise AssertionError
    if lse is None:
        lse = lse_blockwise(q, k, key_padding_mask)
    lse = lse.detach()
    if key_padding_mask is not None:  # no real key at all: lse −inf and zero output, as naive
        empty = key_padding_mask.all(-1)[:, None, None]
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def _naive_with_lse(q, k, v, key_padding_mask):
    scores = torch.matmul(_hi(q), _hi(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
    out = torch.matmul(probs, _hi(v)).to(v.dtype)
    return out, lse.detach()


@torch.no_grad()
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def lse_blockwise(
    q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
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
