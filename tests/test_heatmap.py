"""Heatmaps: GeoJSON polygons are the tiles' level-0 boxes; the PNG blend is exact."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import rankdata

from slidefm.eval.heatmap import (
    normalize_scores,
    render_heatmap,
    slide_thumbnail,
    tile_scores,
    tiles_geojson,
    write_geojson,
)
from slidefm.models.mil import ABMIL


def test_geojson_polygons_are_level0_tile_boxes(tmp_path):
    rng = np.random.default_rng(0)
    s = 448
    coords = np.stack(
        [rng.integers(0, 50, 30) * s + 17, rng.integers(0, 40, 30) * s + 5], 1
    ).astype(np.int64)
    scores = rng.random(30)
    path = write_geojson(tiles_geojson(coords, s, scores, name="attention"), tmp_path / "t.geojson")
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 30
    for i, feat in enumerate(fc["features"]):
        x, y = (int(v) for v in coords[i])
        box = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        assert feat["geometry"] == {"type": "Polygon", "coordinates": [box]}
        props = feat["properties"]
        assert props["tile_index"] == i
        assert props["score"] == pytest.approx(scores[i])
        assert props["measurements"]["attention"] == pytest.approx(scores[i])
        assert props["objectType"] == "detection"
        assert len(props["classification"]["color"]) == 3


def test_normalize_scores_rank_and_minmax():
    s = np.array([0.3, 5.0, -1.0, 0.31, 2.0])
    np.testing.assert_allclose(normalize_scores(s, "rank"), (rankdata(s) - 1) / 4)
    np.testing.assert_allclose(normalize_scores(s, "minmax"), (s + 1) / 6)
    with pytest.raises(ValueError):
        normalize_scores(s, "zscore")


def test_render_blends_colour_over_tiles_only():
    thumb = np.full((40, 60, 3), 255, np.uint8)
    scale, s = 10.0, 100  # tile = 10×10 thumbnail px
    coords = np.array([[0, 0], [200, 100], [500, 300]])
    vals = np.array([0.0, 1.0, 0.5])
    img = np.asarray(render_heatmap(thumb, scale, coords, s, vals, alpha=0.4, cmap="viridis"))
    cm = matplotlib.colormaps["viridis"]
    for (x, y), v in zip(coords, vals):
        want = np.rint(0.6 * 255 + 0.4 * 255 * np.array(cm(v)[:3]))
        cx, cy = int(x / scale) + 5, int(y / scale) + 5
        np.testing.assert_array_equal(img[cy, cx], want)
    assert (img[35, 5] == 255).all()  # no tile there: thumbnail unchanged
    assert (img[5, 15] == 255).all()


def test_tile_scores_attention_and_grad_x_input():
    torch.manual_seed(0)
    feats, grid = torch.randn(7, 8), torch.zeros(7, 2, dtype=torch.long)
    ab = ABMIL(8, 2, hidden=6, attn_dim=4)
    sc, kind, _ = tile_scores(ab, feats, grid)
    ab.eval()
    with torch.no_grad():
        ref = ab(feats[None], grid[None])["attention"][0].numpy()
    assert kind == "attention"
    np.testing.assert_allclose(sc, ref, rtol=1e-6)

    class LinearMean(torch.nn.Module):  # logits = mean_n(x_n) W: contribution of n = x_n·W_c / N
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 3))

        def forward(self, x, grid, pad):
            return {"logits": x.mean(1) @ self.w}

    lm = LinearMean()
    sc, kind, cls = tile_scores(lm, feats, grid, target=2)
    assert kind == "grad_x_input" and cls == 2
    np.testing.assert_allclose(sc, (feats @ lm.w[:, 2] / 7).detach().numpy(), rtol=1e-5, atol=1e-7)


def test_slide_thumbnail_of_real_slide(sample_slide):
    thumb, scale = slide_thumbnail(sample_slide, max_size=512)
    assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) == 512
    assert scale == pytest.approx(2967 / 512, rel=1e-3)  # CMU-1-Small-Region is 2220×2967


def test_heatmap_cli_on_real_slide(tmp_path, sample_slide):
    from slidefm.cli import main
    from slidefm.io.features import SlideFeatures, grid_from_coords, write_features
    from slidefm.models.mil import build_mil_model, save_mil_checkpoint

    s = 256
    xs, ys = np.meshgrid(np.arange(0, 2220 - s, s), np.arange(0, 2967 - s, s))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    n = len(coords)
    rng = np.random.default_rng(0)
    attrs = {
        "encoder": "test",
        "encoder_weights": "random",
        "target_mpp": 0.5,
        "patch_size": 256,
        "patch_size_level0": s,
        "config_hash": "x",
        "seed": 0,
    }
    sf = SlideFeatures(
        "cmu",
        rng.normal(size=(n, 8)).astype(np.float32),
        coords,
        grid_from_coords(coords, s),
        np.ones(n, np.float32),
        attrs,
    )
    feat_path = write_features(tmp_path / "cmu.h5", sf)
    torch.manual_seed(0)
    model = build_mil_model("abmil", 8, 2, hidden=16)
    meta = {
        "model": "abmil",
        "in_dim": 8,
        "num_classes": 2,
        "model_kwargs": {"hidden": 16},
        "task": {"labels": ["m"], "classes": ["0", "1"], "multilabel": False},
    }
    ckpt = save_mil_checkpoint(tmp_path / "model.pt", model, meta)
    out = tmp_path / "hm"
    rc = main(
        [
            "heatmap",
            "--slide",
            str(sample_slide),
            "--features",
            str(feat_path),
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--max-size",
            "400",
        ]
    )
    assert rc == 0
    # full size (default --max-size) opens quickly: well under 1 MB, raw scores too
    for mode in ("rank", "raw"):
        o = tmp_path / f"full_{mode}"
        argv = ["heatmap", "--slide", str(sample_slide), "--features", str(feat_path),
                "--checkpoint", str(ckpt), "--out", str(o), "--normalize", mode]  # fmt: skip
        assert main(argv) == 0
        assert (o / "cmu_heatmap.png").stat().st_size < 700_000
    fc = json.loads((out / "cmu_tiles.geojson").read_text())
    assert len(fc["features"]) == n
    x, y = (int(v) for v in coords[5])
    assert fc["features"][5]["geometry"]["coordinates"][0][2] == [x + s, y + s]
    model.eval()
    with torch.no_grad():
        att = model(
            torch.from_numpy(sf.features)[None], torch.from_numpy(sf.grid.astype(np.int64))[None]
        )["attention"][0].numpy()
    np.testing.assert_allclose([f["properties"]["score"] for f in fc["features"]], att, rtol=1e-5)
    with Image.open(out / "cmu_heatmap.png") as im:
        # the 400-px overlay plus its title, colour bar and margins
        assert 400 < max(im.size) <= 400 + 200 and im.mode == "P"
    with Image.open(out / "cmu_thumbnail.jpg") as im:
        assert max(im.size) == 400
    assert (
        main(
            [
                "heatmap",
                "--features",
                str(feat_path),
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--target",
                "2",
            ]
        )
        == 2
    )


def test_display_range_raw_signed_and_rank():
    from slidefm.eval.heatmap import display_range

    v, lo, hi, signed = display_range(np.array([-1.0, 0.0, 2.0]), "raw")
    assert signed and (lo, hi) == (-2.0, 2.0)
    np.testing.assert_allclose(v, [0.25, 0.5, 1.0])  # 0 is the middle of the colour bar
    v, lo, hi, signed = display_range(np.array([0.1, 0.3, 0.6]), "raw")
    assert not signed and (lo, hi) == (0.1, 0.6)
    np.testing.assert_allclose(v, [0.0, 0.4, 1.0])
    v, lo, hi, _ = display_range(np.array([5.0, 1.0, 3.0]), "rank")
    assert (lo, hi) == (0.0, 100.0)
    np.testing.assert_allclose(v, [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="rank"):
        display_range(np.ones(3), "zscore")
