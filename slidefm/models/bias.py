"""Position biases as objects the attention kernels call, so a new bias is one new class.

A bias belongs to one forward pass over T = P + N tokens (P prefix tokens such as CLS and
registers, then N tiles) and is read two ways:

* ``block(rows, cols)`` — the float32 bias tile of the query rows × key columns (token index
  ranges), for kernels that work block by block (``naive`` asks for the whole square,
  ``sdpa``/``xformers`` for one block of query rows at a time, so memory stays linear in T);
* ``score_mod(score, b, h, q_idx, kv_idx)`` — the same bias added to one score, for
  FlexAttention, which never holds a bias tensor.

The key padding mask is not part of the bias: kernels apply it themselves. The concrete biases
are ``NoBias`` (here) and ``Alibi2DBias`` (``slidefm.models.alibi``); the name → class table is
``slidefm.models.attention.BIASES``.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class AttentionBias:
    """Additive score bias of one forward pass; subclasses implement every method below."""

    name: ClassVar[str]
    # True when the bias adds nothing: kernels may then skip building bias tiles at all.
    zero: ClassVar[bool] = False

    @classmethod
    def from_grid(
        cls, grid: torch.Tensor, num_heads: int, num_prefix_tokens: int = 0
    ) -> AttentionBias:
        """The bias of the tokens of a batch: grid [B, N, 2] (col, row) cells of the N tiles."""
        raise NotImplementedError

    def block(self, rows: slice, cols: slice) -> torch.Tensor | None:
        """float32 [B or 1, H or 1, len(rows), len(cols)] bias tile (broadcastable), None = 0.

        rows, cols: ``slice(start, stop)`` of token indices (prefix tokens first)."""
        raise NotImplementedError

    def score_mod(
        self,
        score: torch.Tensor,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
    ) -> torch.Tensor:
        """FlexAttention ``score_mod``: ``score`` + the bias of (batch b, head h, q_idx, kv_idx)."""
        raise NotImplementedError

    def padded(self, extra: int) -> AttentionBias:
        """The same bias over ``extra`` more tokens at the end (their bias is never used: the
        FlexAttention CPU path pads sequences to a bucket length and masks the extra keys)."""
        return self

    def static_tensors(self) -> tuple[torch.Tensor, ...]:
        """Per-token tensors ``score_mod`` reads (token on dim 1), kept static when compiling."""
        return ()


class NoBias(AttentionBias):
    """No position bias (absolute sin-cos positions, or none)."""

    name = "none"
    zero = True

    @classmethod
    def from_grid(cls, grid: torch.Tensor, num_heads: int, num_prefix_tokens: int = 0) -> NoBias:
        return cls()

    def block(self, rows: slice, cols: slice) -> None:
        return None

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score


NO_BIAS = NoBias()
