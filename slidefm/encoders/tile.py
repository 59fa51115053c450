"""Batched, AMP-aware tile embedding: uint8 tiles in, one float32 vector per tile out.

Preprocessing (resize, crop, normalise) runs on the model's device so the DataLoader only moves
compact uint8 tiles; the model is frozen, in eval mode, and runs under ``inference_mode`` with
bf16/fp16 autocast on CUDA (fp32 on CPU).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidefm.encoders.registry import (
    TileEncoderSpec,
    build_model,
    build_random_model,
    get_spec,
    load_weights,
    resolve_weights,
)
from slidefm.runtime import autocast, pick_device

log = logging.getLogger(__name__)


def pool_tokens(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """(B, T, C) final-norm tokens → (B, D) tile embedding.

    Token layout (timm): ``[CLS, reg_1..reg_r, patch_1..patch_N]``, ``num_prefix_tokens = 1 + r``.
    ``cls`` → D = C; ``mean`` → mean of patch tokens, D = C; ``cls+mean`` → CLS ⊕ patch mean,
    D = 2C (Virchow2). Register tokens never enter the mean.
    """
    cls_tok = tokens[:, 0]
    if pooling == "cls":
        return cls_tok
    patch_mean = tokens[:, num_prefix_tokens:].mean(dim=1)
    if pooling == "mean":
        return patch_mean
    if pooling == "cls+mean":
        return torch.cat([cls_tok, patch_mean], dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}")


def preprocess_tiles(
    tiles: torch.Tensor | np.ndarray, spec: TileEncoderSpec, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 RGB tiles (B, H, W, 3) → normalised float32 (B, 3, S, S) on ``device``.

    Square-resize to ``spec.resize`` px (antialiased ``spec.interpolation``; skipped when the
    tiles already have that size), centre-crop to ``S = spec.input_size`` when smaller, then
    ``(x / 255 − mean) / std``. Runs on ``device`` so only uint8 crosses the host→GPU link.
    """
    x = torch.as_tensor(tiles)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(
            f"tiles must be a uint8 (B, H, W, 3) batch, got {x.dtype} {tuple(x.shape)}"
        )
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    r, s = spec.resize, spec.input_size
    if tuple(x.shape[-2:]) != (r, r):
        x = F.interpolate(
            x, size=(r, r), mode=spec.interpolation, antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)  # bicubic overshoots; PIL/torchvision clamp too
    if s < r:
        top = int(round((r - s) / 2.0))
        x = x[:, :, top : top + s, top : top + s]
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class PooledViT(nn.Module):
    """A timm ViT trunk followed by the spec's token pooling: (B, 3, S, S) → (B, D)."""

    def __init__(self, trunk: nn.Module, pooling: str):
        super().__init__()
        self.trunk = trunk
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # (B, T, C), after the final norm
        return pool_tokens(tokens, self.pooling, self.trunk.num_prefix_tokens)


class TileEncoder:
    """A frozen tile encoder with its preprocessing, ready for batched inference.

    Build with :meth:`create`; call with a uint8 (B, H, W, 3) batch of RGB tiles.
    """

    def __init__(
        self,
        spec: TileEncoderSpec,
        model: PooledViT,
        weights_id: str,
        device: torch.device,
        precision: str = "auto",
    ):
        self.spec = spec
        self.model = model
        self.weights_id = weights_id
        self.device = device
        self.precision = precision

    @classmethod
    def create(
        cls,
        name: str,
        weights: str = "hub",
        device: str | torch.device = "auto",
        precision: str = "auto",
    ) -> TileEncoder:
        """Build the registry entry ``name`` with ``weights`` ("hub", "random" or a file path).

        With a checkpoint the architecture is built on the ``meta`` device and the weights are
        assigned, so a 1.1B-parameter model is never randomly initialised first.
        """
        if precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
        spec = get_spec(name)
        resolved = resolve_weights(spec, weights)
        if resolved.is_random:
            trunk = build_random_model(spec)
            log.warning("tile encoder %s has RANDOM weights: outputs are not pretrained", name)
        else:
            with torch.device("meta"):
                trunk = build_model(spec)
            load_weights(trunk, resolved.path, name)
            left = [
                k
                for k, t in {
                    **dict(trunk.named_parameters()),
                    **dict(trunk.named_buffers()),
                }.items()
                if t.is_meta
            ]
            if left:
                raise RuntimeError(f"{name}: tensors not set by the checkpoint: {left[:5]}")
        dev = pick_device(str(device)) if not isinstance(device, torch.device) else device
        model = PooledViT(trunk, spec.pooling).eval().requires_grad_(False).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return cls(spec, model, resolved.weights_id, dev, precision)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def is_random(self) -> bool:
        return self.weights_id == "random"

    def preprocess(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) tiles → normalised float32 (B, 3, S, S) on ``self.device``."""
        x = preprocess_tiles(tiles, self.spec, self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) tiles → (B, embed_dim) float32 embeddings on ``self.device``."""
        x = self.preprocess(tiles)
        with autocast(self.device, self.precision):
            out = self.model(x)
        return out.float()
