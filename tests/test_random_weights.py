"""``--weights random`` must give input-dependent tile features for every registry entry
(issue 17: timm's LayerScale init 1e-5 made random DINOv2 features identical for a black and
a white tile, cosine 0.999999).

Small entries run the real ``TileEncoder.create`` path at full size. Every entry (the 1.1B ones
too) is also built by ``build_random_model`` with its depth cut to 2 blocks: width, heads,
registers, SwiGLU, LayerScale and pooling are the entry's own, only the block count differs,
so the init logic under test is the same at a fraction of the CPU time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from slidefm.encoders.registry import build_model, build_random_model, get_spec, list_encoders
from slidefm.encoders.tile import PooledViT, TileEncoder, preprocess_tiles

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_COS = 0.99  # distinct tiles must not be near-identical


def _tiles(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.zeros((4, size, size, 3), np.uint8)
    t[1] = 255  # white
    t[2] = rng.integers(0, 256, (size, size, 3))  # noise
    t[3, :, : size // 2] = (200, 120, 180)  # half H&E-pink, half black
    return t


def _max_offdiag_cos(f: torch.Tensor) -> float:
    f = torch.nn.functional.normalize(f.float(), dim=1)
    c = f @ f.T
    return float((c - 2 * torch.eye(len(f))).max())


@pytest.mark.parametrize("name", ["vit_tiny_dev", "dinov2_vits14", "dinov2_vits14_reg"])
def test_random_encoder_features_depend_on_the_tile(name):
    torch.manual_seed(0)
    enc = TileEncoder.create(name, weights="random", device="cpu")
    assert _max_offdiag_cos(enc(_tiles(enc.input_size))) < MAX_COS


@pytest.mark.parametrize("name", list_encoders())
def test_every_entry_random_init_is_input_dependent(name):
    spec = get_spec(name)
    small = dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "depth": 2})
    torch.manual_seed(0)
    model = PooledViT(build_random_model(small), spec.pooling).eval()
    x = preprocess_tiles(_tiles(spec.input_size), spec)
    with torch.inference_mode():
        feats = model(x)
    assert feats.shape == (4, spec.embed_dim)
    assert _max_offdiag_cos(feats) < MAX_COS


def test_layerscale_init_is_what_made_features_constant():
    """The reference: timm's own init (``build_model``) gives near-identical features."""
    spec = get_spec("dinov2_vits14")
    small = dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "depth": 2})
    torch.manual_seed(0)
    model = PooledViT(build_model(small), spec.pooling).eval()
    with torch.inference_mode():
        feats = model(preprocess_tiles(_tiles(224), spec))
    assert _max_offdiag_cos(feats) > 0.9999
