"""CHIEF's slide encoder (Wang et al. 2024, hms-dbmi/CHIEF), restated.

What the published code computes for the slide embedding TRIDENT uses (``WSI_feature``):
h = Dropout(ReLU(Linear(D → H)(x))); gated attention score = Linear(tanh(W_a h) ⊙ σ(W_b h));
embedding = softmax over tiles of the scores @ the *input* features x (D-dimensional, not h).
Tile order and coordinates do not matter. The classifier, instance classifiers, attention
head, text projection and organ embedding are kept so that the published file loads
strictly, but take no part in ``wsi``.
"""

from __future__ import annotations

import torch
from torch import nn

from slidefm.models.published.base import PublishedSlideEncoder
from slidefm.models.slide_encoder import _GatedAttentionPool


class ChiefSlideEncoder(PublishedSlideEncoder):
    """CHIEF (``size_arg='small'``: 768 → 512 → 256); readout ``wsi`` ([B, input_dim])."""

    readouts = ("wsi",)

    def __init__(
        self,
        input_dim: int = 768,
        hidden_dim: int = 512,
        attn_dim: int = 256,
        text_dim: int = 768,
        n_organs: int = 19,
        n_classes: int = 2,
    ):
        super().__init__()
        self.input_dim = self.embed_dim = input_dim
        self.fc = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Dropout(0.25))
        self.pool = _GatedAttentionPool(hidden_dim, attn_dim)
        self.pool.value = nn.Sequential(nn.Linear(hidden_dim, attn_dim), nn.Dropout(0.25))
        self.pool.gate = nn.Sequential(nn.Linear(hidden_dim, attn_dim), nn.Dropout(0.25))
        # Heads of the published model (not used by ``wsi``; loaded for strictness).
        self.classifiers = nn.Linear(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(hidden_dim, 2) for _ in range(n_classes)
        )
        self.att_head = nn.Module()
        self.att_head.fc1 = nn.Linear(hidden_dim, attn_dim)
        self.att_head.fc2 = nn.Linear(attn_dim, 1)
        self.text_to_vision = nn.Sequential(nn.Linear(text_dim, hidden_dim))
        self.register_buffer("organ_embedding", torch.zeros(n_organs, text_dim))

    def embed_one(self, features, coords, patch_size_level0, readout):
        h = self.fc(features[None])
        return self.pool.pool_values(h, features[None], None)[0]


# published key prefix → ours (the gated attention sits at index 3 of CHIEF's attention_net).
_KEY_MAP = (
    ("attention_net.0.", "fc.0."),
    ("attention_net.3.attention_a.0.", "pool.value.0."),
    ("attention_net.3.attention_b.0.", "pool.gate.0."),
    ("attention_net.3.attention_c.", "pool.score."),
)


def _rename(sd: dict[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for old, new in pairs:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def convert_chief(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published ``CHIEF_pretraining.pth`` (flat state dict) → our keys."""
    return _rename(sd, _KEY_MAP)


def export_chief(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys → the published flat ``CHIEF_pretraining.pth`` keys (``convert_chief``'s
    inverse)."""
    return _rename(sd, [(ours, theirs) for theirs, ours in _KEY_MAP])
