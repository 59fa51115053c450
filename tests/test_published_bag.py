"""Published slide encoders behind the bag interface (``PublishedBagEncoder``): a padded batch
of slides of different lengths gives, per slide, the published code's own stored output."""

from __future__ import annotations

import pytest
import torch

from slidefm.models.published.bag import PublishedBagEncoder, published_bag_encoder
from tests.test_published_encoders import _encoder, _load

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULT_READOUT = {"gigapath": "cls", "titan": "slide", "chief": "wsi"}


def _padded(cases: list[dict]) -> tuple[torch.Tensor, ...]:
    """Pad each case's [1, N, ·] inputs to one [B, N_max, ·] batch (+ padding mask)."""
    n = max(c["inputs"]["features"].shape[1] for c in cases)
    feats, coords, pad = [], [], []
    for c in cases:
        f, xy = c["inputs"]["features"][0], c["inputs"]["coords"][0]
        extra = n - f.shape[0]
        feats.append(torch.cat([f, torch.full((extra, f.shape[1]), 7.0)]))  # junk in padding
        coords.append(torch.cat([xy, torch.full((extra, 2), 1e6, dtype=xy.dtype)]))
        pad.append(torch.arange(n) >= f.shape[0])
    sizes = torch.tensor([c["inputs"]["patch_size_level0"] for c in cases], dtype=torch.float64)
    return torch.stack(feats), torch.stack(coords), torch.stack(pad), sizes


@pytest.mark.parametrize("model", ["gigapath", "titan", "chief"])
def test_padded_batch_gives_each_slides_published_output(model: str) -> None:
    fx = _load(f"{model}.pt")
    cases = list(fx["cases"].values())[:3]
    feats, coords, pad, sizes = _padded(cases)
    bag = PublishedBagEncoder(_encoder(fx))
    with torch.no_grad():
        z = bag(feats, None, pad, coords=coords, patch_size_level0=sizes)
    want = torch.stack([c["expected"]["float32"][DEFAULT_READOUT[model]][0] for c in cases])
    assert z.shape == want.shape
    assert float((z - want).abs().max()) < 1e-4


def test_gradients_reach_the_published_weights_and_coords_are_required() -> None:
    fx = _load("titan.pt")
    case = next(iter(fx["cases"].values()))
    bag = PublishedBagEncoder(_encoder(fx)).train()
    x, xy = case["inputs"]["features"], case["inputs"]["coords"]
    bag(
        x, None, None, coords=xy, patch_size_level0=case["inputs"]["patch_size_level0"]
    ).sum().backward()
    grads = [p.grad for p in bag.published.blocks.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(ValueError, match="level-0 coords"):
        bag(x, None, None)


def test_all_layer_readouts_and_own_configs_are_refused() -> None:
    fx = _load("gigapath.pt")
    with pytest.raises(ValueError, match="one embedding per layer"):
        PublishedBagEncoder(_encoder(fx), readout="all_cls")
    with pytest.raises(ValueError, match="not a published slide encoder"):
        published_bag_encoder("tiny")
    for name, arch in [
        ("chief", {"input_dim": 16}),
        ("titan", {"input_dim": 16, "embed_dim": 32, "depth": 1, "num_heads": 4}),
    ]:
        enc = published_bag_encoder(name, weights="random", **arch)
        xy = torch.randint(0, 4000, (2, 9, 2)).float()
        z = enc(torch.randn(2, 9, 16), None, None, coords=xy, patch_size_level0=256.0)
        assert z.shape == (2, enc.embed_dim) and enc.weights_id == "random"
        assert enc.embed_dim == (16 if name == "chief" else 32)
