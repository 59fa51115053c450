"""Masked feature modeling: self-supervised pretraining of a slide encoder on unlabeled slides.

Blocks of neighbouring tiles on the 2D grid are hidden (their input replaced by the encoder's
mask token); a light decoder on the encoder's tile tokens predicts the hidden tiles' features
(per-tile layer-normalised targets, cosine or MSE, masked tokens only) — MAE/iBOT-style. Block
masks force the encoder to use spatial context: a lone hidden tile could be copied from its
neighbours. Optionally an EMA teacher sees the unmasked slide and the student's slide-level
token is distilled towards it (DINO-style centred, sharpened targets).

The encoder interface used: ``encoder.forward_tokens(features[B, N, D], grid[B, N, 2],
padding_mask, token_mask) -> (prefix[B, P, d], tiles[B, N, d])``, ``encoder.readout(prefix,
tiles, padding_mask) -> [B, E]`` (the slide embedding; the distillation trains it, so probes on
``encoder(...)`` see a trained readout) and ``encoder.config`` with ``input_dim`` (D) and
``d_model`` (d).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidefm.models.published.bag import position_inputs
from slidefm.models.standardize import Standardize, keep_flat_keys


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    mask_ratio: float = 0.5  # fraction of a slide's real tiles hidden
    mask_block_min: int = 2  # block sides in grid cells, drawn uniformly in [min, max]
    mask_block_max: int = 6
    decoder: str = "transformer"  # transformer | mlp
    decoder_layers: int = 1
    decoder_dim: int = 256
    decoder_heads: int = 4
    loss: str = "cosine"  # cosine | mse
    standardize_targets: bool = True  # subtract/divide the cohort's per-dimension mean/std
    norm_targets: bool = True  # then per-tile layer norm of the target features
    distill_weight: float = 0.0  # > 0 adds the EMA-teacher slide-level distillation
    ema_momentum: float = 0.996  # teacher momentum at step 0, cosine-increased to 1
    distill_dim: int = 256  # prototypes of the distillation head
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9


@torch.no_grad()
def feature_stats(
    bags: Iterable[torch.Tensor | np.ndarray], max_tiles: int = 200_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std [D] over the tiles of ``bags`` (each [N, D]), in float64,
    stopping after ``max_tiles`` tiles: the target standardisation of ``MaskedFeatureModel``."""
    total, s1, s2 = 0, None, None
    for x in bags:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
        total += len(x)
        if total >= max_tiles:
            break
    if not total:
        raise ValueError("no tiles to compute feature statistics from")
    mean = s1 / total
    std = (s2 / total - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()


def block_mask(
    grid: torch.Tensor,
    padding_mask: torch.Tensor | None,
    ratio: float,
    min_side: int = 2,
    max_side: int = 6,
) -> torch.Tensor:
    """Hide rectangular blocks of real tiles until ``round(ratio · n_real)`` are hidden.

    grid: [B, N, 2] (col, row) cells; padding_mask: [B, N] bool, True = pad. Blocks have
    sides drawn uniformly in [min_side, max_side] cells and contain a random real tile; the last
    block is trimmed at random so the count is exact (at least 1, at most n_real - 1 when
    n_real ≥ 2). Padding is never hidden. Draws from the global torch RNG (CPU), which the
    trainer checkpoints. Returns [B, N] bool, True = hidden.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    b, n = grid.shape[:2]
    g = grid.detach().to("cpu", torch.long)
    real = (
        torch.ones(b, n, dtype=torch.bool)
        if padding_mask is None
        else ~padding_mask.detach().to("cpu", torch.bool)
    )
    out = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        idx = torch.nonzero(real[i]).squeeze(1)
        n_real = len(idx)
        if n_real == 0:
            continue
        target = min(max(1, round(ratio * n_real)), max(1, n_real - 1))
        gi = g[i, idx]
        hidden = torch.zeros(n_real, dtype=torch.bool)
        count = 0
        while count < target:
            side = torch.randint(min_side, max_side + 1, (2,))
            anchor = gi[torch.randint(n_real, (1,)).item()]
            origin = anchor - (torch.rand(2) * side).long()
            new = ((gi >= origin) & (gi < origin + side)).all(dim=1) & ~hidden
            new_idx = torch.nonzero(new).squeeze(1)
            if count + len(new_idx) > target:
                new_idx = new_idx[torch.randperm(len(new_idx))[: target - count]]
            hidden[new_idx] = True
            count += len(new_idx)
        out[i, idx[hidden]] = True
    return out.to(grid.device)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-entropy between the centred, sharpened teacher and the student: [B, K] → scalar."""
    t = F.softmax((teacher_logits - center) / teacher_temp, dim=-1)
    return -(t * F.log_softmax(student_logits / student_temp, dim=-1)).sum(-1).mean()


class FeatureDecoder(nn.Module):
    """Encoder tile tokens [B, N, d] → predicted input features [B, N, D]."""

    def __init__(self, d_model: int, out_dim: int, cfg: PretrainConfig):
        super().__init__()
        self.proj = nn.Linear(d_model, cfg.decoder_dim)
        if cfg.decoder == "transformer":
            layer = nn.TransformerEncoderLayer(
                cfg.decoder_dim,
                cfg.decoder_heads,
                4 * cfg.decoder_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.blocks = nn.TransformerEncoder(
                layer, cfg.decoder_layers, enable_nested_tensor=False
            )
        elif cfg.decoder == "mlp":
            self.blocks = None
            self.mlp = nn.Sequential(nn.GELU(), nn.Linear(cfg.decoder_dim, cfg.decoder_dim))
        else:
            raise ValueError(f"decoder must be 'transformer' or 'mlp', not {cfg.decoder!r}")
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.head = nn.Linear(cfg.decoder_dim, out_dim)

    def forward(self, tiles: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(tiles)
        x = self.blocks(x, src_key_padding_mask=padding_mask) if self.blocks else self.mlp(x)
        return self.head(self.norm(x))


def _distill_head(d_model: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, out_dim)
    )


class MaskedFeatureModel(nn.Module):
    """Encoder + decoder (+ EMA teacher). ``model(batch) -> (loss, metrics)``; the batch is
    ``collate_bags`` output (features [B, N, D], grid [B, N, 2], padding_mask [B, N]).
    """

    def __init__(
        self,
        encoder: nn.Module,
        cfg: PretrainConfig | None = None,
        feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.cfg = cfg = cfg or PretrainConfig()
        in_dim = encoder.config.input_dim
        mean, std = feature_stats or (torch.zeros(in_dim), torch.ones(in_dim))
        # Tile features share a large common direction (for a random ViT, cosine ≈ 0.99 between
        # any tile and the mean tile): without standardisation, predicting the mean scores a
        # near-perfect cosine and the encoder learns nothing.
        # (state-dict keys target_mean / target_std, as before the Standardize module existed)
        self.target_norm = Standardize(in_dim)
        self.target_norm.set_stats(mean, std)
        keep_flat_keys(self, "target_norm", "target")
        if cfg.loss not in ("cosine", "mse"):
            raise ValueError(f"loss must be 'cosine' or 'mse', not {cfg.loss!r}")
        self.encoder = encoder
        d_model = encoder.config.d_model
        self.decoder = FeatureDecoder(d_model, in_dim, cfg)
        if cfg.distill_weight > 0 and getattr(encoder, "needs_coords", False):
            raise ValueError(
                "the slide-level distillation (objective.distill_weight > 0) is not available "
                "for published slide encoders; set objective.distill_weight=0"
            )
        if cfg.distill_weight > 0:
            self.student_head = _distill_head(encoder.embed_dim, cfg.distill_dim)
            self.teacher = copy.deepcopy(encoder).requires_grad_(False)
            self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
            self.register_buffer("center", torch.zeros(cfg.distill_dim))

    def train(self, mode: bool = True) -> MaskedFeatureModel:
        super().train(mode)
        if self.cfg.distill_weight > 0:  # the teacher never uses dropout
            self.teacher.eval()
            self.teacher_head.eval()
        return self

    def predict(
        self, batch: dict[str, Any], token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Masked forward: hidden mask [B, N], predictions and targets [B, N, D], and the
        student's prefix/tile tokens. ``token_mask`` defaults to a fresh ``block_mask``."""
        feats, grid = batch["features"], batch["grid"]
        pad = batch.get("padding_mask")
        if pad is None:
            pad = torch.zeros(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if token_mask is None:
            c = self.cfg
            token_mask = block_mask(grid, pad, c.mask_ratio, c.mask_block_min, c.mask_block_max)
        token_mask = token_mask & ~pad
        prefix, tiles = self.encoder.forward_tokens(
            feats, grid, pad, token_mask=token_mask, **position_inputs(self.encoder, batch)
        )
        pred = self.decoder(tiles, pad)
        target = feats.float()
        if self.cfg.standardize_targets:
            target = self.target_norm(target)
        if self.cfg.norm_targets:
            target = F.layer_norm(target, target.shape[-1:])
        return {
            "mask": token_mask,
            "pad": pad,
            "pred": pred,
            "target": target,
            "prefix": prefix,
            "tiles": tiles,
        }

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.predict(batch)
        sel = out["mask"]
        p, t = out["pred"][sel].float(), out["target"][sel]
        if self.cfg.loss == "cosine":
            mfm = (1 - F.cosine_similarity(p, t, dim=-1)).mean()
        else:
            mfm = F.mse_loss(p, t)
        metrics = {
            "mfm_loss": float(mfm.detach()),
            "mask_frac": float(sel.sum() / (~out["pad"]).sum()),
        }
        loss = mfm
        if self.cfg.distill_weight > 0:
            dist = self._distill(batch, out)
            metrics["distill_loss"] = float(dist.detach())
            loss = mfm + self.cfg.distill_weight * dist
        return loss, metrics

    def _distill(self, batch: dict[str, Any], out: dict[str, torch.Tensor]) -> torch.Tensor:
        c, pad = self.cfg, out["pad"]
        s = self.student_head(self.encoder.readout(out["prefix"], out["tiles"], pad).float())
        with torch.no_grad():
            t = self.teacher_head(self.teacher(batch["features"], batch["grid"], pad).float())
        loss = dino_loss(s, t, self.center, c.student_temp, c.teacher_temp)
        if self.training:
            with torch.no_grad():
                self.center.mul_(c.center_momentum).add_(t.mean(0), alpha=1 - c.center_momentum)
        return loss

    def ema_momentum(self, step: int, max_steps: int) -> float:
        """Cosine schedule from ``cfg.ema_momentum`` at step 0 to 1 at ``max_steps``."""
        m0 = self.cfg.ema_momentum
        return 1 - (1 - m0) * (math.cos(math.pi * min(step, max_steps) / max_steps) + 1) / 2

    @torch.no_grad()
    def on_optimizer_step(self, step: int, max_steps: int) -> None:
        """Called by the Trainer after each optimizer step: EMA update of the teacher."""
        if self.cfg.distill_weight <= 0:
            return
        m = self.ema_momentum(step, max_steps)
        for dst, src in ((self.teacher, self.encoder), (self.teacher_head, self.student_head)):
            for pt, ps in zip(dst.parameters(), src.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
