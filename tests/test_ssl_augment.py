"""Stain augmentation of pretrain-tiles against the Beer–Lambert formula it implements."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from skimage.color import rgb_from_hed

from slidefm.encoders.ssl_augment import (
    MultiCrop,
    MultiCropConfig,
    hed_jitter,
    jittered_stain_vectors,
)

LOG_ADJUST = np.log(1e-6)  # skimage's OD scaling: stains are in units of -log(rgb)/-log(1e-6)


def he_image(rng: np.random.Generator, vectors: np.ndarray, n: int = 12) -> np.ndarray:
    """(n, n, 3) RGB in (0, 1] mixed from non-negative H/E concentrations (no DAB) with the
    given OD vectors: rgb = exp(log(1e-6) · c @ M), Beer–Lambert as skimage defines it."""
    c = np.zeros((n, n, 3))
    c[..., :2] = rng.uniform(0.0, 0.15, (n, n, 2))
    return np.exp(LOG_ADJUST * c @ vectors)


def test_concentration_jitter_and_new_stain_vectors_follow_beer_lambert():
    rng = np.random.default_rng(0)
    img = he_image(rng, rgb_from_hed)
    alpha, beta = np.array([1.2, 0.8, 1.0]), np.array([0.01, -0.005, 0.0])
    m = jittered_stain_vectors(np.random.default_rng(1), 0.05)
    got = hed_jitter(img, alpha, beta, m)
    # the concentrations the image was made from, recovered independently by least squares
    od = np.log(img.reshape(-1, 3)) / LOG_ADJUST
    conc = np.linalg.lstsq(rgb_from_hed.T, od.T, rcond=None)[0].T
    want = np.exp(LOG_ADJUST * (np.clip(conc, 0, None) * alpha + beta) @ m).reshape(img.shape)
    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)
    # the unperturbed matrix is the default path
    np.testing.assert_allclose(hed_jitter(img, alpha, beta, rgb_from_hed.copy()),
                               hed_jitter(img, alpha, beta), atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(hed_jitter(img, np.ones(3), np.zeros(3)), img, atol=1e-6)


def test_jittered_stain_vectors_are_absorbing_unit_vectors():
    m0 = jittered_stain_vectors(np.random.default_rng(2), 0.0)
    np.testing.assert_allclose(m0[:2], rgb_from_hed[:2] / np.linalg.norm(rgb_from_hed[:2], axis=1,
                                                                          keepdims=True))  # fmt: skip
    for seed in range(20):
        m = jittered_stain_vectors(np.random.default_rng(seed), 0.3)
        np.testing.assert_allclose(np.linalg.norm(m[:2], axis=1), 1.0)
        assert (m[:2] > 0).all()
        np.testing.assert_array_equal(m[2], rgb_from_hed[2])  # DAB untouched
    a, b = (jittered_stain_vectors(np.random.default_rng(3), 0.05) for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_multicrop_stream_unchanged_when_vector_jitter_is_off_and_changed_when_on():
    patch = (he_image(np.random.default_rng(4), rgb_from_hed, 72) * 255).astype(np.uint8)
    base = MultiCropConfig(global_size=32, local_size=16, n_local=2, p_hed=1.0)
    views = {}
    for name, cfg in (
        ("default", base),
        ("off", dataclasses.replace(base, hed_vector_sigma=0.0, hed_shift=base.hed_sigma)),
        ("on", dataclasses.replace(base, hed_vector_sigma=0.05)),
    ):
        views[name] = MultiCrop(cfg, (0.5,) * 3, (0.25,) * 3)(patch, np.random.default_rng(5))
    for k in ("global", "local"):
        assert torch.equal(views["default"][k], views["off"][k])
        assert not torch.allclose(views["default"][k], views["on"][k])
    assert views["on"]["global"].shape == (2, 3, 32, 32)
    assert views["on"]["local"].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_vector_jitter_changes_hue_not_only_amount(sigma):
    """Concentration jitter keeps each pixel's OD direction inside the H/E plane of the
    decomposing vectors; new vectors move it out of that plane (a hue change)."""
    rng = np.random.default_rng(6)
    img = he_image(rng, rgb_from_hed)
    out = hed_jitter(img, np.ones(3), np.zeros(3), jittered_stain_vectors(rng, sigma))
    od = np.log(np.clip(out.reshape(-1, 3), 1e-6, 1)) / LOG_ADJUST
    normal = np.cross(rgb_from_hed[0], rgb_from_hed[1])
    off_plane = np.abs(od @ normal / np.linalg.norm(normal)) / np.linalg.norm(od, axis=1)
    assert np.median(off_plane) > sigma / 10
