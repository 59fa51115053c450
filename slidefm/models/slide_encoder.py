"""SlideEncoder: tile features on their 2D grid → one slide embedding.

input projection → (mask token) → (2D sin-cos) → [CLS, registers, tiles] → pre-norm
transformer blocks (full attention with 2D ALiBi, or LongNet dilated attention) → final norm →
readout (CLS, masked mean, or gated attention pooling).

TITAN-like and Prov-GigaPath-like shapes are YAML files under ``configs/slide_encoder/``.
Memory stays linear in the number of tiles on the ``sdpa``/``flex``/``xformers`` backends and
with dilated attention; ``naive`` materialises everything and is the test oracle.

For dilated attention the tiles are put in row-major grid order (padding last) before the
blocks and restored afterwards: LongNet's segments then hold spatial neighbours, the result does
not depend on the order of the input rows, and padding never shifts a real tile's segment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from slidefm.config import ConfigError, from_dict, load_yaml, resolve_config_path
from slidefm.io.checkpoints import Kind, register_kind
from slidefm.models.attention import BACKENDS, BIASES, FullAttention, _hi
from slidefm.models.bias import AttentionBias
from slidefm.models.dilated import DilatedAttention
from slidefm.models.posenc import sincos_2d
from slidefm.models.standardize import Standardize, keep_flat_keys, restore_provenance

CHECKPOINT_FORMAT = "slidefm.slide_encoder"  # the format before slidefm.io.checkpoints
KIND = "slide_encoder"
# Options that change how the same weights are run, not the weights: may differ on load.
RUNTIME_FIELDS = (
    "name",
    "backend",
    "attn_block_size",
    "grad_checkpointing",
    "dropout",
    "drop_path",
)


@dataclasses.dataclass(frozen=True)
class SlideEncoderConfig:
    name: str = "custom"
    input_dim: int = 768  # D_in: tile feature width
    d_model: int = 768
    depth: int = 6
    num_heads: int = 12
    mlp_ratio: float = 4.0
    input_proj: str = "linear"  # linear (Linear + GELU) | mlp (Linear, GELU, Linear)
    cls_token: bool = True
    num_register_tokens: int = 0
    readout: str = "cls"  # cls | mean | attn (gated attention pooling over tiles)
    position: str = "alibi2d"  # alibi2d | sincos2d | none
    attention: str = "full"  # full | dilated (LongNet)
    backend: str = "sdpa"  # naive | sdpa | flex | xformers
    segment_lengths: tuple[int, ...] = (1024, 5792, 32768, 185363, 1048576)  # dilated only
    dilation_ratios: tuple[int, ...] = (1, 2, 4, 8, 16)
    attn_block_size: int = 1024  # query rows per ALiBi bias block (sdpa, xformers)
    qkv_bias: bool = True
    dropout: float = 0.0  # after the MLP and the attention projection (no attention dropout)
    drop_path: float = 0.0  # stochastic depth, linearly increased over blocks up to this
    grad_checkpointing: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"slide encoder config {self.name!r}: {msg}")

        choices = {
            "input_proj": ("linear", "mlp"),
            "readout": ("cls", "mean", "attn"),
            "position": ("alibi2d", "sincos2d", "none"),
            "attention": ("full", "dilated"),
            "backend": BACKENDS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(f"{key}={getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        if self.d_model % self.num_heads:
            bad(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.readout == "cls" and not self.cls_token:
            bad("readout 'cls' needs cls_token: true")
        if self.position == "sincos2d" and self.d_model % 4:
            bad("position 'sincos2d' needs d_model divisible by 4")
        if self.attention == "dilated":
            if self.position == "alibi2d":
                bad(
                    "2D ALiBi is defined for full attention; with attention 'dilated' use "
                    "position 'sincos2d' (as Prov-GigaPath) or 'none'"
                )
            if len(self.segment_lengths) != len(self.dilation_ratios) or not self.segment_lengths:
                bad("segment_lengths and dilation_ratios must be non-empty and of equal length")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token) + self.num_register_tokens


@dataclasses.dataclass
class _Context:
    """What every block's attention needs besides x (per forward pass)."""

    bias: AttentionBias  # position bias over the P + N tokens (NoBias without ALiBi)
    padding_mask: torch.Tensor | None  # [B, P + N] bool, True = pad


def attention_core(cfg: SlideEncoderConfig) -> FullAttention | DilatedAttention:
    """The parameter-free attention module of ``cfg`` (q, k, v [B, H, T, Dh] → [B, H, T, Dh])."""
    if cfg.attention == "dilated":
        return DilatedAttention(cfg.segment_lengths, cfg.dilation_ratios, cfg.backend)
    return FullAttention(cfg.backend, cfg.attn_block_size)


class _Attention(nn.Module):
    def __init__(self, cfg: SlideEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.core = attention_core(cfg)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b t (n h d) -> n b h t d", n=3, h=self.num_heads)
        out = self.core(*qkv, ctx.bias, ctx.padding_mask)
        return self.drop(self.proj(rearrange(out, "b h t d -> b t (h d)")))


class _Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: SlideEncoderConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = _Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        hidden = int(cfg.d_model * cfg.mlp_ratio)
        self.mlp = Mlp(cfg.d_model, hidden, act_layer=nn.GELU, drop=cfg.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), ctx))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _GatedAttentionPool(nn.Module):
    """ABMIL-style gated attention pooling over the real tiles."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def weights(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, N, d] → [B, N] attention weights (≥ float32) summing to 1 over real tiles."""
        a = self.score(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))).squeeze(-1)
        a = _hi(a)
        if padding_mask is not None:
            a = a.masked_fill(padding_mask, float("-inf"))
        return a.softmax(-1)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.pool_values(x, x, padding_mask)

    def pool_values(
        self, x: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Weights from x [B, N, d], applied to values [B, N, D] (CHIEF pools its inputs)."""
        w = self.weights(x, padding_mask)
        return torch.einsum("bn,bnd->bd", w, _hi(values)).to(values.dtype)


class SlideEncoder(nn.Module):
    """Slide transformer; see the module docstring. ``embed_dim`` = width of the embedding."""

    def __init__(self, config: SlideEncoderConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed_dim = d
        if config.input_proj == "linear":
            self.input_proj = nn.Sequential(nn.Linear(config.input_dim, d), nn.GELU())
        else:
            self.input_proj = Mlp(config.input_dim, d, d, act_layer=nn.GELU)
        self.mask_token = nn.Parameter(torch.zeros(d))
        n_prefix = config.num_prefix_tokens
        self.prefix_tokens = nn.Parameter(torch.zeros(1, n_prefix, d)) if n_prefix else None
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(_Block(config, r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.pool = _GatedAttentionPool(d, d // 2) if config.readout == "attn" else None
        # Per-dimension input standardisation (cohort statistics set by pretraining, saved with
        # the weights): tile features of a frozen ViT share one dominant direction, which a
        # randomly initialised input projection otherwise turns into a near-constant token.
        # (state-dict keys input_mean / input_std, as before the Standardize module existed)
        self.input_norm = Standardize(config.input_dim)
        keep_flat_keys(self, "input_norm", "input")
        # The attention bias of each forward pass (2D ALiBi or none; sincos2d is added to x).
        self.bias_type = BIASES["alibi2d" if config.position == "alibi2d" else "none"]
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.prefix_tokens is not None:
            nn.init.normal_(self.prefix_tokens, std=0.02)

    # ------------------------------------------------------------------ construction / io

    def set_input_stats(
        self, mean: torch.Tensor, std: torch.Tensor, provenance: dict[str, Any] | None = None
    ) -> None:
        """Standardise inputs as (features − mean) / std, both [D_in] (tile-feature units)."""
        self.input_norm.set_stats(mean, std, provenance)

    @property
    def input_mean(self) -> torch.Tensor:
        return self.input_norm.mean

    @property
    def input_std(self) -> torch.Tensor:
        return self.input_norm.std

    @classmethod
    def from_config(cls, name_or_path: str | Path, **overrides: Any) -> SlideEncoder:
        """Build from ``configs/slide_encoder/<name>.yaml`` (or a YAML path) with field overrides."""
        path = resolve_config_path(name_or_path, "slide_encoder")
        data = {"name": path.stem, **load_yaml(path), **overrides}
        return cls(from_dict(SlideEncoderConfig, data))

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write config + weights + slidefm version (+ ``extra`` provenance) atomically, in the
        one checkpoint format (``slidefm.io.checkpoints``, kind ``slide_encoder``)."""
        from slidefm.io.checkpoints import save_checkpoint

        config = dataclasses.asdict(self.config)
        return save_checkpoint(path, self, KIND, config, {"extra": dict(extra or {})})

    @staticmethod
    def _read_checkpoint(path: str | Path) -> dict[str, Any]:
        """The checkpoint's payload, with ``slidefm_version`` and ``extra`` at the top level (as
        in the format before ``slidefm.io.checkpoints``)."""
        from slidefm.io.checkpoints import read_checkpoint

        payload = read_checkpoint(path, KIND)
        return {**payload, **_meta(payload)}

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Load weights saved by ``save_checkpoint`` into this encoder (architectures must match);
        returns the checkpoint's metadata (config, slidefm_version, extra, provenance, sha256)."""
        payload = self._read_checkpoint(path)
        mine, theirs = dataclasses.asdict(self.config), dict(payload["config"])
        diff = sorted(
            k for k in mine if k not in RUNTIME_FIELDS and _norm(mine[k]) != _norm(theirs.get(k))
        )
        if diff:
            raise ValueError(
                f"{path} holds a different architecture ({', '.join(diff)} differ); "
                "use SlideEncoder.from_checkpoint(path) to build the matching encoder"
            )
        self.load_state_dict(_with_default_buffers(self, payload["state_dict"]))
        restore_provenance(self, payload.get("standardization") or {})
        return _meta(payload)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> SlideEncoder:
        """Encoder with the checkpoint's config (runtime fields such as ``backend`` overridable)."""
        payload = cls._read_checkpoint(path)
        bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
        if bad:
            raise ValueError(f"cannot override {bad} on a checkpoint; only {RUNTIME_FIELDS}")
        enc = cls(from_dict(SlideEncoderConfig, {**payload["config"], **overrides}))
        enc.load_state_dict(_with_default_buffers(enc, payload["state_dict"]))
        restore_provenance(enc, payload.get("standardization") or {})
        return enc

    # ------------------------------------------------------------------------------ forward

    def forward_tokens(
        self,
        features: torch.Tensor,
        grid: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contextualised tokens after the final norm.

        features: [B, N, D_in]; grid: [B, N, 2] (col, row) cells; padding_mask: [B, N] bool,
        True = padded tile; token_mask: [B, N] bool, True = input replaced by the learned mask
        token (masked feature modeling). Returns (prefix [B, P, d], tiles [B, N, d]) with tiles
        in input order and padded tiles set to 0.
        """
        cfg = self.config
        bsz, n, d_in = features.shape
        if d_in != cfg.input_dim:
            raise ValueError(
                f"features are {d_in}-d but slide encoder {cfg.name!r} expects {cfg.input_dim}-d "
                "(set input_dim to match the tile encoder)"
            )
        if grid.shape != (bsz, n, 2):
            raise ValueError(f"grid must be [B, N, 2] = {[bsz, n, 2]}, got {list(grid.shape)}")
        pad = padding_mask.to(torch.bool) if padding_mask is not None else None
        if pad is not None and cfg.num_prefix_tokens == 0 and bool(pad.all(-1).any()):
            raise ValueError("a slide in the batch has no tiles (all padded)")
        x = self.input_proj(self.input_norm(features))
        if token_mask is not None:
            x = torch.where(token_mask[..., None], self.mask_token.to(x.dtype), x)
        if cfg.position == "sincos2d":
            x = x + sincos_2d(grid, cfg.d_model).to(x.dtype)
        order = None
        if cfg.attention == "dilated":
            order = _row_major_order(grid, pad)
            x, grid = _take(x, order), _take(grid, order)
            pad = _take(pad, order) if pad is not None else None
        n_prefix = cfg.num_prefix_tokens
        if n_prefix:
            x = torch.cat([self.prefix_tokens.expand(bsz, -1, -1).to(x.dtype), x], dim=1)
        full_pad = F.pad(pad, (n_prefix, 0), value=False) if pad is not None else None
        bias = self.bias_type.from_grid(grid, cfg.num_heads, n_prefix)
        ctx = _Context(bias=bias, padding_mask=full_pad)
        use_ckpt = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, ctx, use_reentrant=False) if use_ckpt else blk(x, ctx)
        x = self.norm(x)
        prefix, tiles = x[:, :n_prefix], x[:, n_prefix:]
        if order is not None:
            tiles = _take(tiles, torch.argsort(order, dim=1))
            pad = padding_mask.to(torch.bool) if padding_mask is not None else None
        if pad is not None:
            tiles = tiles.masked_fill(pad[..., None], 0.0)
        return prefix, tiles

    def readout(
        self, prefix: torch.Tensor, tiles: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Slide embedding [B, E] from ``forward_tokens``' outputs, per ``config.readout``."""
        if self.config.readout == "cls":
            return prefix[:, 0]
        pad = padding_mask.to(torch.bool) if padding_mask is not None else None
        if self.config.readout == "attn":
            return self.pool(tiles, pad)
        if pad is None:
            return tiles.mean(1)
        keep = (~pad).unsqueeze(-1).to(tiles.dtype)
        return (tiles * keep).sum(1) / keep.sum(1).clamp(min=1)

    @torch.no_grad()
    def embed(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        patch_size_level0: float,
        readout: str | None = None,
    ) -> torch.Tensor:
        """The registry's common call: features [B, N, D], coords [B, N, 2] level-0 px (x, y),
        tile side in level-0 px → [B, E]; grid = floor((coords − min) / patch_size_level0)."""
        if readout not in (None, self.config.readout):
            raise ValueError(
                f"slide encoder {self.config.name!r} has readout {self.config.readout!r} only"
            )
        c = coords.to(torch.float64)
        grid = torch.floor((c - c.amin(dim=1, keepdim=True)) / float(patch_size_level0) + 1e-6)
        return self(features.to(self.input_mean.dtype), grid.to(torch.int64))

    def forward(
        self, features: torch.Tensor, grid: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features [B, N, D_in], grid [B, N, 2], padding_mask [B, N] (True = pad) → [B, E]."""
        prefix, tiles = self.forward_tokens(features, grid, padding_mask)
        return self.readout(prefix, tiles, padding_mask)


def _with_default_buffers(enc: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """Checkpoints written before input standardisation existed load as mean 0, std 1."""
    own = enc.state_dict()
    return {**{k: own[k] for k in ("input_mean", "input_std") if k not in state}, **state}


def _meta(payload: dict[str, Any]) -> dict[str, Any]:
    """What ``load_checkpoint`` returns: the payload without weights, with the keys the old
    format had at the top (``slidefm_version``, ``extra``)."""
    prov = payload.get("provenance") or {}
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return {**meta, "slidefm_version": prov.get("slidefm_version"), "extra": prov.get("extra", {})}


def _legacy(raw: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A ``slidefm.slide_encoder`` file (before the one format): config, weights, provenance."""
    prov = {"slidefm_version": raw.get("slidefm_version"), "extra": raw.get("extra", {})}
    return raw["config"], raw["state_dict"], prov


def _build(config: dict[str, Any], payload: dict[str, Any]) -> SlideEncoder:
    return SlideEncoder(from_dict(SlideEncoderConfig, config))


_HINT = "written by SlideEncoder.save_checkpoint, e.g. <pretrain out>/encoder.pt"
register_kind(Kind(KIND, "slide encoder checkpoint", _build, _HINT, CHECKPOINT_FORMAT, _legacy))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v


def _row_major_order(grid: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """[B, N] permutation sorting tiles by (row, col), padded tiles last (stable)."""
    g = grid.to(torch.int64)
    g = g - g.amin(dim=1, keepdim=True)  # non-negative cells, so the key below is injective
    width = g[..., 0].max() + 1
    key = g[..., 1] * width + g[..., 0]
    if pad is not None:
        key = key.masked_fill(pad, torch.iinfo(torch.int64).max)
    return torch.argsort(key, dim=1, stable=True)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b]] along dim 1 for [B, N, ...] tensors."""
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))
