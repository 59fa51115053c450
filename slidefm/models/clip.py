"""Slide ↔ report dual encoder trained with a symmetric InfoNCE (CLIP) loss.

Slide side: a slide encoder (``encoder(features[B, N, D], grid[B, N, 2], padding_mask[B, N])
-> [B, E_slide]``) — frozen, partially or fully trainable — or precomputed slide embeddings
[B, E_slide], followed by a projection head into the joint space [B, E]. Text side: a text tower
(``slidefm.encoders.text``) and an optional projection. Both outputs are L2-normalised; logits
are ``exp(logit_scale) · cos``, with ``logit_scale`` learnable, initialised at log(1/0.07) and
clamped in place to [0, log(100)] after every optimizer step, as open_clip's training loop does.

The loss is open_clip's ``ClipLoss``. Under DDP it gathers every rank's features with gradient
(``gather_with_grad``) and computes each rank's rows against all columns (``local_loss``):
the averaged gradient then equals the single-process gradient of the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slidefm.encoders.text import (
    ReportTokenizer,
    TextTowerConfig,
    build_text_tower,
)
from slidefm.io.checkpoints import Kind, register_kind
from slidefm.models.standardize import Standardize, keep_flat_keys
from slidefm.runtime import dist_info

CHECKPOINT_FORMAT = "slidefm.align"  # the format before slidefm.io.checkpoints
KIND = "align"


@dataclasses.dataclass(frozen=True)
class AlignModelConfig:
    embed_dim: int = 256  # joint space
    slide_proj: str = "mlp"  # linear | mlp (Linear-GELU-Linear)
    slide_trainable: str = "frozen"  # frozen | partial | full (when a slide encoder is used)
    trainable_blocks: int = 1  # partial: the last N transformer blocks (+ what follows them)
    text_proj: str = "auto"  # auto (identity when dims match) | linear
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)

    def __post_init__(self) -> None:
        if self.slide_proj not in ("linear", "mlp"):
            raise ValueError(f"slide_proj must be linear or mlp, not {self.slide_proj!r}")
        if self.slide_trainable not in ("frozen", "partial", "full"):
            raise ValueError(
                f"slide_trainable must be frozen, partial or full, not {self.slide_trainable!r}"
            )
        if self.text_proj not in ("auto", "linear"):
            raise ValueError(f"text_proj must be auto or linear, not {self.text_proj!r}")
        if isinstance(self.text, dict):  # a checkpoint's (or a caller's) mapping
            from slidefm.config import from_dict

            object.__setattr__(self, "text", from_dict(TextTowerConfig, self.text, "model.text"))


def clip_loss(
    slide_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    world_size: int | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows (open_clip ``ClipLoss``), negatives from every rank.

    slide_features, text_features: [B, E] L2-normalised, row i of each is a positive pair;
    logit_scale: the multiplier (already exponentiated). Returns the scalar
    ½ (CE(slide→text) + CE(text→slide)), in nats.
    """
    from open_clip.loss import ClipLoss

    r, w = dist_info()
    world_size = w if world_size is None else world_size
    rank = r if rank is None else rank
    loss = ClipLoss(
        local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank, world_size=world_size
    )
    return loss(slide_features, text_features, logit_scale)


def set_trainable(encoder: nn.Module, mode: str, last_blocks: int = 1) -> list[str]:
    """Freeze ``encoder`` (frozen), unfreeze it (full), or unfreeze its last ``last_blocks``
    transformer blocks plus every parameter registered after them — final norm, readout —
    (partial). Blocks are parameters named ``…(blocks|layers).<i>.…``. Returns the names of the
    trainable parameters.
    """
    names = [n for n, _ in encoder.named_parameters()]
    if mode == "full":
        keep = set(names)
    elif mode == "frozen":
        keep = set()
    elif mode == "partial":
        idx = {
            n: int(m.group(2)) for n in names if (m := re.search(r"(blocks|layers)\.(\d+)\.", n))
        }
        if not idx:
            raise ValueError(
                "slide_trainable=partial needs a slide encoder with numbered blocks; "
                "use frozen or full"
            )
        first = max(idx.values()) + 1 - max(0, int(last_blocks))
        last_block_pos = max(i for i, n in enumerate(names) if n in idx)
        keep = {n for n in names if idx.get(n, -1) >= first}
        keep |= {n for i, n in enumerate(names) if i > last_block_pos and n not in idx}
    else:
        raise ValueError(f"unknown slide_trainable mode {mode!r}")
    for n, p in encoder.named_parameters():
        p.requires_grad_(n in keep)
    return [n for n in names if n in keep]


class SlideTextModel(nn.Module):
    """Slide/text dual encoder. ``forward(batch) -> (loss, metrics)`` for the ``Trainer``.

    batch: ``text`` int64 ids [M, L] (``text_owner`` [M] when reports are chunked: chunk → row
    of the batch), and either ``embeddings`` [B, E_slide] or ``features`` [B, N, D], ``grid``
    [B, N, 2], ``padding_mask`` [B, N] (True = pad).
    """

    def __init__(
        self,
        cfg: AlignModelConfig,
        slide_dim: int,
        tokenizer_model: str | Path | bytes | None = None,
        slide_encoder: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        from slidefm.config import from_dict

        self.text_cfg = from_dict(TextTowerConfig, cfg.text or {})
        self.slide_dim = int(slide_dim)
        self.slide_encoder = slide_encoder
        self.trainable_encoder_params: list[str] = []
        if slide_encoder is not None:
            self.trainable_encoder_params = set_trainable(
                slide_encoder, cfg.slide_trainable, cfg.trainable_blocks
            )
        e = cfg.embed_dim
        if cfg.slide_proj == "linear":
            self.slide_proj: nn.Module = nn.Linear(self.slide_dim, e)
        else:
            self.slide_proj = nn.Sequential(
                nn.LayerNorm(self.slide_dim),
                nn.Linear(self.slide_dim, e),
                nn.GELU(),
                nn.Linear(e, e),
            )
        self.text_tower, self.tokenizer = build_text_tower(self.text_cfg, tokenizer_model)
        out = int(self.text_tower.output_dim)
        self.text_proj = (
            nn.Identity() if cfg.text_proj == "auto" and out == e else nn.Linear(out, e, bias=False)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        # Per-dimension standardisation of slide embeddings (identity until set_slide_stats);
        # state-dict keys slide_mean / slide_std, as before the Standardize module existed.
        self.slide_norm = Standardize(self.slide_dim)
        keep_flat_keys(self, "slide_norm", "slide")

    @torch.no_grad()
    def set_slide_stats(self, embeddings: torch.Tensor) -> None:
        """Standardise slide embeddings [N, E_slide] per dimension with these (training)
        statistics before the projection head. A frozen encoder's embeddings can vary in a few
        low-variance directions only (e.g. an unsupervised CLS token); z-scoring makes those
        directions usable by the head. Saved with the model (buffers)."""
        x = torch.as_tensor(embeddings, dtype=torch.float32)
        self.slide_norm.set_stats(
            x.mean(0), x.std(0), {"fitted_on": "training slide embeddings", "n": len(x)}
        )

    @property
    def slide_mean(self) -> torch.Tensor:
        return self.slide_norm.mean

    @property
    def slide_std(self) -> torch.Tensor:
        return self.slide_norm.std

    # ------------------------------------------------------------------ encoders
    @property
    def encoder_frozen(self) -> bool:
        return self.slide_encoder is not None and not self.trainable_encoder_params

    def train(self, mode: bool = True) -> SlideTextModel:
        """A frozen slide encoder stays in eval mode (no dropout) while the heads train."""
        super().train(mode)
        if self.encoder_frozen:
            self.slide_encoder.eval()
        return self

    def slide_embed(
        self,
        features: torch.Tensor,
        grid: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        **positions: Any,
    ) -> torch.Tensor:
        """Slide-encoder output [B, E_slide] (before the projection head). ``positions``:
        ``coords`` [B, N, 2] level-0 px and ``patch_size_level0`` for published encoders."""
        if self.slide_encoder is None:
            raise ValueError(
                "this alignment model was trained on precomputed slide embeddings: "
                "pass embeddings (e.g. --embeddings H5), not tile features"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            return self.slide_encoder(features, grid, padding_mask, **positions)

    def encode_slide(
        self,
        features: torch.Tensor | None = None,
        grid: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        normalize: bool = True,
        **positions: Any,
    ) -> torch.Tensor:
        """Slides → joint space [B, E]: from tile features (through the slide encoder) or from
        slide-encoder embeddings [B, E_slide] computed beforehand."""
        if embeddings is None:
            if features is None or grid is None:
                raise ValueError("encode_slide needs features and grid, or embeddings")
            embeddings = self.slide_embed(features, grid, padding_mask, **positions)
        if embeddings.shape[-1] != self.slide_dim:
            raise ValueError(
                f"slide embeddings are {embeddings.shape[-1]}-d, the model expects "
                f"{self.slide_dim}-d (were they made with the same slide encoder?)"
            )
        z = self.slide_proj(self.slide_norm(embeddings.float()))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(
        self,
        ids: torch.Tensor,
        owner: torch.Tensor | None = None,
        num_texts: int | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Token ids [M, L] → [M, E]; with ``owner`` [M] (chunked reports) the normalised mean
        of each text's chunk embeddings → [num_texts, E]."""
        z = F.normalize(self.text_proj(self.text_tower(ids)), dim=-1)
        if owner is not None:
            n = int(num_texts if num_texts is not None else int(owner.max()) + 1)
            z = torch.zeros(n, z.shape[1], dtype=z.dtype, device=z.device).index_add(0, owner, z)
        return F.normalize(z, dim=-1) if normalize else z

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts → {text, (text_owner)} per ``text.long_text`` (truncate or chunk)."""
        if self.text_cfg.long_text == "chunk" and isinstance(self.tokenizer, ReportTokenizer):
            ids, owner = self.tokenizer.encode_chunks(texts, self.text_cfg.max_chunks)
            return {"text": ids, "text_owner": owner}
        return {"text": self.tokenizer(texts)}

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Raw texts → normalised joint-space embeddings [len(texts), E] (eval mode)."""
        device = self.logit_scale.device
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            owner = tok.get("text_owner")
            out.append(
                self.encode_text(
                    tok["text"].to(device),
                    None if owner is None else owner.to(device),
                    len(texts[i : i + batch_size]),
                )
            )
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp()

    # --------------------------------------------------------------------- train
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if "embeddings" in batch:
            zs = self.encode_slide(embeddings=batch["embeddings"])
        else:
            from slidefm.models.published.bag import position_inputs

            pos = position_inputs(self.slide_encoder, batch) if self.slide_encoder else {}
            zs = self.encode_slide(
                batch["features"], batch["grid"], batch.get("padding_mask"), **pos
            )
        zt = self.encode_text(batch["text"], batch.get("text_owner"), len(zs))
        loss = clip_loss(zs, zt, self.scale)
        with torch.no_grad():
            acc = (zs @ zt.T).argmax(1).eq(torch.arange(len(zs), device=zs.device)).float().mean()
        return loss, {"logit_scale": float(self.scale.detach()), "batch_acc_s2t": float(acc)}

    @torch.no_grad()
    def on_optimizer_step(self, step: int, max_steps: int) -> None:
        """Clamp the temperature as open_clip does: 0 ≤ logit_scale ≤ log(max_logit_scale)."""
        self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    # ---------------------------------------------------------------- zero-shot
    @torch.no_grad()
    def zero_shot(self, slide_embeddings: torch.Tensor, prompts: Any) -> torch.Tensor:
        """Class probabilities [N, C] for slide-encoder embeddings [N, E_slide].

        ``prompts``: a ``slidefm.eval.zero_shot.PromptSet``, a prompt YAML path, or a mapping
        {class: [synonyms]} (then the default templates are used). See ``eval.zero_shot``.
        """
        from slidefm.eval.zero_shot import as_prompt_set, class_embeddings, zero_shot_probs

        ps = as_prompt_set(prompts)
        dev = self.logit_scale.device
        zs = self.encode_slide(embeddings=torch.as_tensor(slide_embeddings).float().to(dev))
        zc = class_embeddings(self.embed_texts, ps)
        return zero_shot_probs(zs, zc, self.scale)

    # --------------------------------------------------------------- checkpoint
    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Self-contained file: config, weights, tokenizer model bytes, slide-encoder config,
        in the one checkpoint format (``slidefm.io.checkpoints``, kind ``align``)."""
        from slidefm.io.checkpoints import save_checkpoint

        enc_cfg = None
        if hasattr(self.slide_encoder, "config_record"):  # published: registry name + arch
            enc_cfg = self.slide_encoder.config_record()
        elif self.slide_encoder is not None:
            c = getattr(self.slide_encoder, "config", None)
            enc_cfg = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c
        config = {
            "model": dataclasses.asdict(self.cfg),
            "slide_dim": self.slide_dim,
            "slide_encoder_config": enc_cfg,
            "tokenizer": getattr(self.tokenizer, "model_bytes", None),
        }
        return save_checkpoint(path, self, KIND, config, {"extra": extra or {}})

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> SlideTextModel:
        """Rebuild a ``save_checkpoint`` file (the extra dict is in ``model.checkpoint_extra``)."""
        from slidefm.io.checkpoints import load_checkpoint

        model, meta = load_checkpoint(path, KIND, map_location)
        model.checkpoint_extra = meta["provenance"].get("extra", {})
        return model


def _build(config: dict[str, Any], payload: dict[str, Any]) -> SlideTextModel:
    enc = None
    record = config["slide_encoder_config"]
    if record is not None and "published" in record:
        from slidefm.models.published.bag import bag_encoder_from_record

        enc = bag_encoder_from_record(record)
    elif record is not None:
        from slidefm.config import from_dict
        from slidefm.models.slide_encoder import SlideEncoder, SlideEncoderConfig

        enc = SlideEncoder(from_dict(SlideEncoderConfig, config["slide_encoder_config"]))
    return SlideTextModel(
        AlignModelConfig(**config["model"]),
        config["slide_dim"],
        tokenizer_model=config["tokenizer"],
        slide_encoder=enc,
    )


def _legacy(raw: dict[str, Any]) -> tuple[dict, dict, dict]:
    """A ``slidefm.align`` file (before the one format): config, weights, provenance."""
    keys = ("slide_dim", "slide_encoder_config", "tokenizer")
    config = {"model": raw["config"], **{k: raw[k] for k in keys}}
    return config, raw["state_dict"], {"extra": raw.get("extra") or {}}


_HINT = "use <align out>/align.pt"
register_kind(Kind(KIND, "alignment checkpoint", _build, _HINT, CHECKPOINT_FORMAT, _legacy))
