"""Multiple-instance learning heads on tile-feature bags: mean/max pooling, gated-attention
ABMIL, TransMIL, and the pretrained slide encoder with a head.

Every model has one call signature, so training, prediction and heatmaps never special-case:

    model(features[B, N, D], grid[B, N, 2] int (col, row), padding_mask[B, N] bool, True = pad)
        -> {"logits": [B, C], "attention": [B, N] (optional; 0 on padding)}

Padding never influences the output: a padded bag gives the same logits as the bag alone.
Targets: single-label (binary = 2 classes, multi-class) use softmax cross-entropy over C logits;
multi-label uses one sigmoid per logit (see ``mil_loss``).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidefm.io.checkpoints import Kind, register_kind
from slidefm.models.standardize import Standardize


def _mask(features: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, N] bool, True = pad (all False when no mask is given)."""
    if padding_mask is None:
        return torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
    return padding_mask.to(torch.bool)


def _tile_mlp(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class _TileMIL(nn.Module):
    """Per-tile MLP ``self.tile`` → pooling over the real tiles (``_pool``) → linear ``self.head``.

    The subclasses build ``tile`` and ``head`` in their own ``__init__`` (the order of module
    creation fixes the seeded initialisation, so it stays as it was); they share this forward.
    """

    tile: nn.Module
    head: nn.Module

    def _pool(
        self, h: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """h [B, N, H], pad [B, N] → (pooled [B, H], extra outputs such as ``attention``)."""
        raise NotImplementedError

    def forward(
        self,
        features: torch.Tensor,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pad = _mask(features, padding_mask)
        h = self.tile(features)  # [B, N, H]
        pooled, extra = self._pool(h, pad)
        return {"logits": self.head(pooled), **extra}


class PoolMIL(_TileMIL):
    """Baselines: per-tile MLP, then masked mean or max over tiles, then a linear classifier.

    Mean pooling can learn "how much of X is in the slide"; neither can use tile positions.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        pool: str = "mean",
        hidden: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', not {pool!r}")
        self.pool = pool
        self.tile = _tile_mlp(in_dim, hidden, dropout)
        self.head = nn.Linear(hidden, num_classes)

    def _pool(
        self, h: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.pool == "mean":
            keep = (~pad).unsqueeze(-1).to(h.dtype)
            return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0), {}
        pooled = h.masked_fill(pad.unsqueeze(-1), float("-inf")).amax(1)
        return torch.nan_to_num(pooled, neginf=0.0), {}  # an all-pad bag gives zeros


class ABMIL(_TileMIL):
    """Gated attention MIL (Ilse et al. 2018; CLAM-SB layout).

    a_i = w^T (tanh(V h_i) ⊙ sigmoid(U h_i)); attention = softmax over the bag's real tiles;
    slide vector = Σ attention_i h_i. ``attention`` [B, N] is returned for heatmaps.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden: int = 256,
        attn_dim: int = 128,
        dropout: float = 0.25,
    ):
        super().__init__()
        self.tile = _tile_mlp(in_dim, hidden, dropout)
        self.attn_v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attn_u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_w = nn.Linear(attn_dim, 1)
        self.head = nn.Linear(hidden, num_classes)

    def _pool(
        self, h: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1)  # [B, N] raw scores
        a = a.float().masked_fill(pad, float("-inf"))
        w = torch.nan_to_num(torch.softmax(a, dim=1), nan=0.0)  # all-pad bag → zeros
        pooled = torch.einsum("bn,bnh->bh", w.to(h.dtype), h)
        return pooled, {"attention": w, "attention_raw": a}


def _pinv(x: torch.Tensor) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse in float32 (SVD; exact, unlike the iterative scheme)."""
    return torch.linalg.pinv(x.float())


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation (Xiong et al. 2021) as used by
    TransMIL, for one bag at a time (x: [1, n, dim]).

    Landmarks are means of ``num_landmarks`` contiguous, near-equal token segments (no zero
    padding, so no empty landmarks). When n ≤ num_landmarks, exact softmax attention is used:
    the approximation would only cost accuracy. Unlike the reference ``nystrom-attention``
    package there is no depthwise-conv residual on the values (PPEG already mixes neighbours).
    """

    def __init__(self, dim: int, heads: int = 8, num_landmarks: int = 256, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.num_landmarks = heads, num_landmarks
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (
            t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v)
        )  # [b, h, n, d]
        scale = q.shape[-1] ** -0.5
        m = self.num_landmarks
        if n <= m:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            seg = torch.arange(n, device=x.device) * m // n  # segment id of each token, 0..m-1
            counts = torch.bincount(seg, minlength=m).to(q.dtype).view(1, 1, m, 1)
            q_l = (
                torch.zeros(
                    b, self.heads, m, q.shape[-1], dtype=q.dtype, device=x.device
                ).index_add_(2, seg, q)
                / counts
            )
            k_l = torch.zeros_like(q_l).index_add_(2, seg, k) / counts
            k1 = torch.softmax(q @ k_l.transpose(-1, -2) * scale, dim=-1)  # [b, h, n, m]
            k2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # [b, h, m, m]
            k3 = torch.softmax(q_l @ k.transpose(-1, -2) * scale, dim=-1)  # [b, h, m, n]
            o = (k1.float() @ _pinv(k2)) @ (k3.float() @ v.float())
            o = o.to(v.dtype)
        return self.out(o.transpose(1, 2).reshape(b, n, dim))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on the tiles laid out
    on their real slide grid (the original reshapes the sequence into an arbitrary square;
    using ``grid`` keeps true neighbours adjacent). Empty grid cells are zeros.

    Memory: one [dim, rows, cols] canvas per bag (bounding box of the tissue's grid cells).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)
        )

    def forward(self, h: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """h: [n, dim] tile tokens; grid: [n, 2] (col, row) → [n, dim]."""
        g = grid.long() - grid.long().amin(0, keepdim=True)
        cols, rows = int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1
        flat = g[:, 1] * cols + g[:, 0]
        canvas = h.new_zeros(rows * cols, h.shape[1]).index_copy(0, flat, h)
        canvas = canvas.t().reshape(1, h.shape[1], rows, cols)
        mixed = canvas + sum(conv(canvas) for conv in self.convs)
        return mixed.reshape(h.shape[1], rows * cols).t()[flat]


class TransMIL(nn.Module):
    """TransMIL (Shao et al. 2021): tile projection, CLS token, Nyström layer, PPEG, Nyström
    layer, CLS readout. Runs bag by bag (PPEG and landmarks are defined on one bag), which
    also makes padding exactly irrelevant. ``num_landmarks`` defaults to dim // 2 as in TransMIL.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        landmarks = num_landmarks or dim // 2
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1, self.norm2, self.norm_out = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.attn1 = NystromAttention(dim, heads, landmarks, dropout)
        self.attn2 = NystromAttention(dim, heads, landmarks, dropout)
        self.ppeg = PPEG(dim)
        self.head = nn.Linear(dim, num_classes)

    def _one(self, feats: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        h = self.proj(feats).unsqueeze(0)  # [1, n, dim]
        x = torch.cat([self.cls, h], dim=1)
        x = x + self.attn1(self.norm1(x))
        x = torch.cat([x[:, :1], self.ppeg(x[0, 1:], grid).unsqueeze(0)], dim=1)
        x = x + self.attn2(self.norm2(x))
        return self.head(self.norm_out(x[0, 0]))

    def forward(
        self,
        features: torch.Tensor,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pad = _mask(features, padding_mask)
        if grid is None:  # no positions: lay the tiles out in one row
            grid = torch.stack(
                [torch.arange(features.shape[1]), torch.zeros(features.shape[1], dtype=torch.long)],
                -1,
            )
            grid = grid.unsqueeze(0).expand(features.shape[0], -1, -1).to(features.device)
        logits = [
            self._one(features[b][~pad[b]], grid[b][~pad[b]]) for b in range(features.shape[0])
        ]
        return {"logits": torch.stack(logits)}


def _embed_dim(encoder: nn.Module, in_dim: int) -> int:
    """Output width of a slide encoder: its declared attribute, else one dummy forward."""
    for name in ("embed_dim", "out_dim", "output_dim", "dim"):
        v = getattr(encoder, name, None)
        if isinstance(v, int):
            return v
    cfg = getattr(encoder, "cfg", None) or getattr(encoder, "config", None)
    for name in ("embed_dim", "out_dim", "dim"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    with torch.no_grad():
        was = encoder.training
        encoder.eval()
        out = encoder(
            torch.zeros(1, 1, in_dim),
            torch.zeros(1, 1, 2, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.bool),
        )
        encoder.train(was)
    return int(out.shape[-1])


class SlideEncoderMIL(nn.Module):
    """A pretrained slide encoder ``encoder(features, grid, padding_mask) -> [B, E]`` with a
    linear head. ``freeze=True`` trains only the head (a linear probe trained end to end on
    bags); ``freeze=False`` fine-tunes everything.

    The head reads z-scored embeddings (``embedding_norm``, statistics of the training fold's
    embeddings, set by ``set_embedding_stats``): slide embeddings carry a large shared offset
    (norm ~11 against a per-dimension spread ~0.7 for our pretrained encoders), which left a
    linear head trained with AdamW at MIL learning rates near chance where a logistic
    regression on the same embeddings reached AUROC 0.94.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_dim: int,
        num_classes: int,
        freeze: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder, self.freeze = encoder, freeze
        if freeze:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        dim = _embed_dim(encoder, in_dim)
        self.embedding_norm = Standardize(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def set_embedding_stats(self, embeddings: torch.Tensor | np.ndarray) -> None:
        """Standardise the head's input with these training embeddings' mean and std [N, E]."""
        self.embedding_norm.fit(embeddings, {"fitted_on": "training-fold slide embeddings"})

    def train(self, mode: bool = True) -> SlideEncoderMIL:
        super().train(mode)
        if self.freeze:  # a frozen encoder keeps eval-mode dropout/normalisation
            self.encoder.eval()
        return self

    def forward(
        self,
        features: torch.Tensor | None,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        **positions: Any,
    ) -> dict[str, torch.Tensor]:
        """``embedding`` [B, E]: the frozen encoder's output computed beforehand (training a
        frozen encoder's head needs each slide's embedding once, not once per epoch).
        ``positions``: ``coords`` [B, N, 2] level-0 px and ``patch_size_level0`` [B], for
        published encoders (``needs_coords``)."""
        if embedding is not None:
            return {
                "logits": self.head(self.embedding_norm(embedding.float())),
                "embedding": embedding,
            }
        if features is None or grid is None:
            raise ValueError("SlideEncoderMIL needs tile features and grid positions")
        pad = _mask(features, padding_mask)
        if self.freeze:
            with torch.no_grad():
                z = self.encoder(features, grid, pad, **positions)
        else:
            z = self.encoder(features, grid, pad, **positions)
        return {"logits": self.head(self.embedding_norm(z.float())), "embedding": z}

    @property
    def needs_coords(self) -> bool:
        return bool(getattr(self.encoder, "needs_coords", False))


ZScore = Standardize  # the MIL name of the one standardisation module (``models.standardize``)


class Standardized(nn.Module):
    """A MIL model fed standardised tile features (``ZScore`` with the training fold's tile
    statistics). Frozen tile encoders often give features with large shared offsets and tiny
    per-dimension spread; without this the first layer sees nearly identical tiles and learns
    slowly.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        provenance: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.zscore = Standardize(len(mean))
        self.zscore.set_stats(mean, std, provenance or {"fitted_on": "training-fold tiles"})

    def forward(
        self,
        features: torch.Tensor | None,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if features is not None:
            features = self.zscore(features)
        return self.model(features, grid, padding_mask, **kwargs)


@dataclasses.dataclass(frozen=True)
class MILHeadEntry:
    """One MIL head: its class, the options fixed by the entry, what it needs and gives."""

    name: str
    description: str
    cls: type[nn.Module]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. pool="mean"
    needs_encoder: bool = False  # built around a slide encoder: cls(encoder, in_dim, C, …)
    uses_grid: bool = False  # reads tile positions (TransMIL's PPEG; a slide encoder)
    attention: bool = False  # returns per-tile ``attention`` (heatmaps)

    def options(self) -> list[str]:
        """The keyword options (a MIL config's ``model_kwargs``) this head takes."""
        skip = {"self", "encoder", "in_dim", "num_classes", *self.fixed}
        return [p for p in inspect.signature(self.cls).parameters if p not in skip]

    def build(
        self, in_dim: int, num_classes: int, encoder: nn.Module | None = None, **kw: Any
    ) -> nn.Module:
        bad = sorted(set(kw) - set(self.options()))
        if bad:
            raise ValueError(
                f"MIL model {self.name!r} has no option(s) {', '.join(bad)}; "
                f"its options: {', '.join(self.options())}"
            )
        if not self.needs_encoder:
            return self.cls(in_dim, num_classes, **self.fixed, **kw)
        if encoder is None:
            raise ValueError(
                f"--model {self.name} needs a slide encoder (--slide-encoder CHECKPOINT)"
            )
        return self.cls(encoder, in_dim, num_classes, **kw)


MIL_HEADS: dict[str, MILHeadEntry] = {
    e.name: e
    for e in (
        MILHeadEntry(
            "mean", "per-tile MLP, masked mean pooling, linear", PoolMIL, {"pool": "mean"}
        ),
        MILHeadEntry("max", "per-tile MLP, masked max pooling, linear", PoolMIL, {"pool": "max"}),
        MILHeadEntry(
            "abmil", "gated-attention MIL (Ilse et al. 2018, CLAM-SB layout)", ABMIL, attention=True
        ),
        MILHeadEntry(
            "transmil",
            "TransMIL (Shao et al. 2021): Nyström attention + PPEG on the slide grid",
            TransMIL,
            uses_grid=True,
        ),
        MILHeadEntry(
            "slide_encoder",
            "a slidefm slide encoder (frozen or fine-tuned) + z-scored linear head",
            SlideEncoderMIL,
            needs_encoder=True,
            uses_grid=True,
        ),
    )
}


def list_mil_heads() -> list[str]:
    """Registered MIL head names (``slidefm mil-heads list``; ``mil train --model``)."""
    return list(MIL_HEADS)


def get_mil_head(name: str) -> MILHeadEntry:
    if name not in MIL_HEADS:
        raise ValueError(f"Unknown MIL model {name!r}; choose one of {', '.join(MIL_HEADS)}")
    return MIL_HEADS[name]


def create_mil_head(
    name: str,
    in_dim: int,
    num_classes: int,
    encoder: nn.Module | None = None,
    weights: str | Path = "random",
    **kwargs: Any,
) -> nn.Module:
    """MIL head ``name`` (``list_mil_heads()``) for ``in_dim``-d tiles and ``num_classes`` logits.

    ``encoder``: the slide encoder of ``slide_encoder``. ``weights``: ``"random"`` (seeded
    initialisation), or a ``slidefm mil train`` checkpoint (``<out>/seed*/fold*/model.pt``) of
    this head, loaded with its recorded options (``kwargs`` must then be empty).
    ``**kwargs``: the head's options (``get_mil_head(name).options()``); an unknown one is a
    ValueError naming the known ones.
    """
    entry = get_mil_head(name)
    if str(weights) != "random":
        if kwargs or encoder is not None:
            raise ValueError("a MIL checkpoint records its options: pass weights=PATH alone")
        model, meta = load_mil_checkpoint(weights)
        if meta["model"] != name or meta["in_dim"] != in_dim or meta["num_classes"] != num_classes:
            raise ValueError(
                f"{weights} holds a {meta['model']} head for {meta['in_dim']}-d tiles and "
                f"{meta['num_classes']} outputs, not {name} for {in_dim}-d / {num_classes}"
            )
        return model
    return entry.build(in_dim, num_classes, encoder, **kwargs)


def build_mil_model(
    name: str, in_dim: int, num_classes: int, encoder: nn.Module | None = None, **kwargs: Any
) -> nn.Module:
    """Model by name (``MIL_HEADS``); ``encoder`` is required for ``slide_encoder``."""
    return create_mil_head(name, in_dim, num_classes, encoder=encoder, **kwargs)


def class_weights(labels: torch.Tensor, num_classes: int, multilabel: bool = False) -> torch.Tensor:
    """Inverse-frequency weights so each class contributes equally to the loss.

    Single-label: [C] = N / (C · count_c) (sklearn's "balanced"). Multi-label: [C] positive
    weights = negatives / positives per label, for ``BCEWithLogits(pos_weight=…)``.
    Classes absent from ``labels`` get weight 1.
    """
    labels = torch.as_tensor(labels)
    if multilabel:
        pos = labels.float().sum(0)
        neg = labels.shape[0] - pos
        return torch.where(pos > 0, neg / pos.clamp_min(1), torch.ones_like(pos))
    counts = torch.bincount(labels.long(), minlength=num_classes).float()
    w = labels.numel() / (num_classes * counts.clamp_min(1))
    return torch.where(counts > 0, w, torch.ones_like(w))


def mil_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    multilabel: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy for single-label targets ([B] int), BCE-with-logits for multi-label
    ([B, C] {0,1}); ``weight`` from ``class_weights``."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight)
    return F.cross_entropy(logits.float(), target.long(), weight=weight)


def probabilities(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """[B, C] logits → probabilities (softmax, or per-label sigmoid)."""
    return torch.sigmoid(logits.float()) if multilabel else torch.softmax(logits.float(), dim=-1)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


CHECKPOINT_FORMAT = "slidefm.mil"  # the format before slidefm.io.checkpoints
KIND = "mil"
# What rebuilds the model (the checkpoint's config); the rest of meta is provenance.
ARCH_KEYS = ("model", "in_dim", "num_classes", "model_kwargs", "slide_encoder", "standardize")


def save_mil_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a self-describing MIL checkpoint: ``meta`` must hold ``model`` (name), ``in_dim``,
    ``num_classes``, ``model_kwargs`` and, for ``slide_encoder``, ``slide_encoder`` (the config
    name or checkpoint it was built from). Written atomically, in the one checkpoint format
    (``slidefm.io.checkpoints``, kind ``mil``)."""
    from slidefm.io.checkpoints import save_checkpoint

    missing = [k for k in ("model", "in_dim", "num_classes", "model_kwargs") if k not in meta]
    if missing:
        raise ValueError(f"MIL checkpoint meta lacks {missing}")
    config = {k: meta[k] for k in ARCH_KEYS if k in meta}
    provenance = {k: v for k, v in meta.items() if k not in ARCH_KEYS}
    return save_checkpoint(path, model, KIND, config, provenance)


def build_slide_encoder(
    spec: str, in_dim: int, weights: str | None = None
) -> tuple[nn.Module, str]:
    """A slide encoder from a checkpoint file, or a registry name with ``weights`` (``random``
    builds it for ``in_dim``-d tile features) → (encoder, weights id): the checkpoint's absolute
    path (``NAME@sha256:…`` for registry weights) or ``"random"``. The grammar is
    ``models.registry.slide_encoder_from_spec``'s (a bare config name still means random, with
    a DEPRECATED warning)."""
    from slidefm.models.published.bag import PublishedBagEncoder
    from slidefm.models.registry import is_published, slide_encoder_from_spec

    enc, info = slide_encoder_from_spec(spec, weights, input_dim=in_dim)
    if is_published(enc):  # Prov-GigaPath / TITAN / CHIEF: per-slide, level-0 coords
        enc = PublishedBagEncoder(enc)
    if info["slide_encoder_weights"] == "random":
        return enc, "random"
    if Path(info["slide_encoder"]).is_file():
        return enc, info["slide_encoder"]
    return enc, f"{info['slide_encoder']}@sha256:{info['slide_encoder_sha256']}"


def slide_encoder_from_config_dict(config: dict[str, Any]) -> nn.Module:
    """The architecture recorded in a MIL checkpoint (weights come from its state_dict)."""
    if "published" in config:
        from slidefm.models.published.bag import bag_encoder_from_record

        return bag_encoder_from_record(config)
    from slidefm.config import from_dict
    from slidefm.models.slide_encoder import SlideEncoder, SlideEncoderConfig

    return SlideEncoder(from_dict(SlideEncoderConfig, config))


def slide_encoder_weights(spec: str, weights: str | None = None) -> str:
    """What ``build_slide_encoder(spec, weights=weights)`` loads: the checkpoint's absolute
    path, ``weights`` given with a registry name (``hub`` / a path), or ``"random"``."""
    p = Path(spec)
    if p.is_file() and p.suffix in (".pt", ".pth", ".ckpt", ".safetensors"):
        return str(p.resolve())
    if weights and weights != "random":
        return weights if weights == "hub" else str(Path(weights).expanduser().resolve())
    return "random"


def load_mil_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by ``save_mil_checkpoint`` → (model in eval mode, meta), read
    with ``weights_only=True``; ``meta`` is the dict that was saved."""
    from slidefm.io.checkpoints import load_checkpoint

    model, payload = load_checkpoint(path, KIND, map_location)
    prov = {k: v for k, v in payload["provenance"].items() if k not in _WRITER_KEYS}
    return model, {**prov, **payload["config"]}


_WRITER_KEYS = ("slidefm_version", "legacy_format")


def _build_from_config(meta: dict[str, Any], payload: dict[str, Any]) -> nn.Module:
    encoder = None
    if meta["model"] == "slide_encoder":
        # The recorded architecture; all weights (encoder included) come from state_dict.
        encoder = slide_encoder_from_config_dict(meta["slide_encoder"]["config"])
    model = build_mil_model(
        meta["model"], meta["in_dim"], meta["num_classes"], encoder=encoder, **meta["model_kwargs"]
    )
    if meta.get("standardize"):
        model = Standardized(model, torch.zeros(meta["in_dim"]), torch.ones(meta["in_dim"]))
    return model


def _legacy(raw: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A ``slidefm.mil`` file (before the one format): config, weights, provenance."""
    meta = raw["meta"]
    config = {k: meta[k] for k in ARCH_KEYS if k in meta}
    return config, raw["state_dict"], {k: v for k, v in meta.items() if k not in ARCH_KEYS}


_HINT = "written by `slidefm mil train` as <out>/seed*/fold*/model.pt"
register_kind(Kind(KIND, "MIL checkpoint", _build_from_config, _HINT, CHECKPOINT_FORMAT, _legacy))
