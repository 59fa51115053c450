"""Feature bags: crops, grid augmentations, subsampling, dataset items and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bag_utils import random_grid, write_random_bags
from scipy.spatial.distance import pdist

from slidefm.io.bags import (
    FeatureBagDataset,
    collate_bags,
    feature_dropout,
    random_grid_crop,
    rotate_flip_grid,
    subsample,
)
from slidefm.io.features import read_features


def test_rotate_flip_hand_example():
    g = np.array([[0, 0], [2, 0], [2, 1]])
    # 90°: (c, r) -> (-r, c) = (0,0), (0,2), (-1,2); shifted by (+1, 0)
    np.testing.assert_array_equal(rotate_flip_grid(g, 1, False), [[1, 0], [1, 2], [0, 2]])
    # 180°: (c, r) -> (-c, -r) = (0,0), (-2,0), (-2,-1); shifted by (+2, +1)
    np.testing.assert_array_equal(rotate_flip_grid(g, 2, False), [[2, 1], [0, 1], [0, 0]])
    # mirror columns only: (0,0), (-2,0), (-2,1) -> shifted by +2
    np.testing.assert_array_equal(rotate_flip_grid(g, 0, True), [[2, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(rotate_flip_grid(g, 4, False), g)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_rotate_flip_preserves_distances(k, flip):
    g = random_grid(np.random.default_rng(k), 40, 15)
    out = rotate_flip_grid(g, k, flip)
    np.testing.assert_allclose(pdist(out), pdist(g))
    assert out.min(axis=0).tolist() == [0, 0]
    assert len({tuple(x) for x in out}) == len(g)


def test_crop_on_dense_grid_is_a_window():
    side = 40
    c, r = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    g = np.stack([c.ravel(), r.ravel()], axis=1)
    full = 0
    for s in range(50):
        idx = random_grid_crop(g, 16, np.random.default_rng(s))
        sel = g[idx]
        w, h = sel.max(axis=0) - sel.min(axis=0) + 1
        assert w <= 16 and h <= 16
        assert len(idx) == w * h  # a dense grid cropped by a window is a full rectangle
        full += len(idx) == 256
    assert full > 10  # most windows lie inside a 40×40 slide


def test_crop_range_and_small_slide():
    g = random_grid(np.random.default_rng(0), 30, 8)
    assert len(random_grid_crop(g, 16, np.random.default_rng(1))) == 30  # smaller than window
    sides = set()
    big = np.stack(np.meshgrid(np.arange(64), np.arange(64)), -1).reshape(-1, 2)
    for s in range(40):
        sel = big[random_grid_crop(big, (4, 8), np.random.default_rng(s))]
        ext = sel.max(axis=0) - sel.min(axis=0) + 1
        assert ext.max() <= 8
        sides.add(int(ext.max()))
    assert len(sides) > 2  # the side is drawn from the range
    with pytest.raises(ValueError):
        random_grid_crop(g, (8, 4), np.random.default_rng(0))


def test_subsample_and_dropout():
    rng = np.random.default_rng(0)
    idx = subsample(100, 30, rng)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(subsample(10, 30, rng), np.arange(10))
    x = np.ones((200, 50), np.float32)
    y = feature_dropout(x, 0.25, rng)
    assert abs((y == 0).mean() - 0.25) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.75)


def test_dataset_real_bag_unaugmented(shared_data):
    path = shared_data / "embeddings/mopadi_tcga/TCGA-AD-6964-01Z-00-DX1.h5"
    ds = FeatureBagDataset([path], labels=[1])
    it = ds[0]
    ref = read_features(path)
    assert it["slide_id"] == "TCGA-AD-6964-01Z-00-DX1"
    assert it["features"].dtype == torch.float32 and it["grid"].dtype == torch.int64
    np.testing.assert_array_equal(it["features"].numpy(), ref.features)
    np.testing.assert_array_equal(it["grid"].numpy(), ref.grid - ref.grid.min(axis=0))
    assert it["label"] == 1


def test_dataset_randomness_is_seeded_per_epoch(tmp_path):
    ids = write_random_bags(tmp_path, num=3, n_range=(60, 80))
    ds = FeatureBagDataset(tmp_path, crop=(4, 6), augment=True, max_tiles=20, seed=3)
    a = ds[1]
    ds2 = FeatureBagDataset(tmp_path, crop=(4, 6), augment=True, max_tiles=20, seed=3)
    b = ds2[1]
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["grid"], b["grid"])
    ds2.set_epoch(1)
    c = ds2[1]
    assert c["features"].shape != a["features"].shape or not torch.equal(
        c["features"], a["features"]
    )
    assert a["features"].shape[0] <= 20
    # Every cropped tile's features are a (dropped-out) row of the original slide.
    orig = read_features(tmp_path / f"{ids[1]}.h5").features
    for row in a["features"].numpy():
        nz = row != 0
        match = np.isclose(orig[:, nz] / 0.9, row[nz], atol=1e-5).all(axis=1)
        assert match.any()


def test_dataset_selection_labels_and_errors(tmp_path):
    write_random_bags(tmp_path, num=4)
    ds = FeatureBagDataset(tmp_path, slide_ids=["bag2", "bag0"], labels={"bag0": 0, "bag2": 1})
    assert [ds[i]["slide_id"] for i in range(2)] == ["bag2", "bag0"]
    assert [ds[i]["label"] for i in range(2)] == [1, 0]
    with pytest.raises(FileNotFoundError, match="bag9"):
        FeatureBagDataset(tmp_path, slide_ids=["bag9"])
    with pytest.raises(ValueError, match="No label"):
        FeatureBagDataset(tmp_path, labels={"bag0": 1})
    with pytest.raises(FileNotFoundError):
        FeatureBagDataset(tmp_path / "nope")


def test_collate_pads_and_masks():
    items = [
        {
            "slide_id": "a",
            "features": torch.ones(3, 2),
            "grid": torch.ones(3, 2).long(),
            "label": 0,
        },
        {
            "slide_id": "b",
            "features": 2 * torch.ones(5, 2),
            "grid": torch.zeros(5, 2).long(),
            "label": 1,
        },
    ]
    b = collate_bags(items)
    assert b["features"].shape == (2, 5, 2) and b["grid"].shape == (2, 5, 2)
    assert b["padding_mask"].tolist() == [[False] * 3 + [True] * 2, [False] * 5]
    assert b["features"][0, 3:].abs().sum() == 0 and b["features"][1].eq(2).all()
    assert b["slide_id"] == ["a", "b"] and b["label"].tolist() == [0, 1]
    assert "label" not in collate_bags([{k: v for k, v in items[0].items() if k != "label"}])


@pytest.mark.parametrize("cached", [False, True])
def test_items_carry_each_tiles_level0_coords(tmp_path, cached):
    """Published encoders read absolute coords: every (feature row, coords) pair of a cropped,
    subsampled item is a pair of the file, and collate pads coords with the mask."""
    from slidefm.io.bags import bag_rows, list_feature_files, load_bags

    ids = write_random_bags(tmp_path, num=3, n_range=(40, 60))
    bags = load_bags(list_feature_files(tmp_path), progress=False, cache_gb=8.0 if cached else 0)
    assert (bags.cached is not None) == cached
    datasets = [
        FeatureBagDataset(tmp_path, crop=(4, 6), max_tiles=15, seed=1),
        bag_rows(bags, np.arange(3), np.zeros(3), max_tiles=15, seed=1),
    ]
    for ds in datasets:
        items = [ds[i] for i in range(3)]
        for sid, it in zip(ids, items):
            sf = read_features(tmp_path / f"{sid}.h5")
            pairs = {tuple(c) + tuple(f) for c, f in zip(sf.coords.tolist(), sf.features.tolist())}
            got = zip(it["coords"].tolist(), it["features"].tolist())
            assert all(tuple(c) + tuple(f) in pairs for c, f in got)
            assert it["patch_size_level0"] == 256.0
        batch = collate_bags(items)
        n = [len(it["features"]) for it in items]
        assert batch["coords"].shape == (3, max(n), 2)
        for i, k in enumerate(n):
            assert torch.equal(batch["coords"][i, :k], items[i]["coords"])
            assert not batch["padding_mask"][i, :k].any() and batch["padding_mask"][i, k:].all()
        assert batch["patch_size_level0"].tolist() == [256.0] * 3
