"""Reader, tissue, tiling and stain tests on the real slides in ../shared/data/slides."""

from __future__ import annotations

import json
import math

import numpy as np
import openslide
import pytest
from PIL import Image

from slidefm.wsi.patches import TileRegionDataset, iter_tile_batches, tile_loader
from slidefm.wsi.reader import MissingMPPError, SlideReader, SlideReadError, mpp_from_properties
from slidefm.wsi.stain import estimate_stains, macenko_normalize
from slidefm.wsi.tiling import EmptyTissueError, make_tile_grid
from slidefm.wsi.tissue import TissueConfig, area_fraction, tissue_mask

OPENABLE = [
    "CMU-1-Small-Region.svs",
    "TCGA-CR-7395-01A-01-TS1.svs",
    "test3-DAPI-2-387.ndpi",
    "fixtures/small.svs",
    "fixtures/boxes.tiff",
    "fixtures/boxes_0.dcm",
]


@pytest.fixture(scope="module")
def props(slides_dir):
    return json.loads((slides_dir / "PROPERTIES.json").read_text())


@pytest.mark.parametrize("name", OPENABLE)
def test_reader_matches_recorded_properties(slides_dir, props, name):
    p = props[name]
    with SlideReader(slides_dir / name) as r:
        assert [r.info.width, r.info.height] == p["dimensions"]
        assert r.info.level_count == p["level_count"]
        np.testing.assert_allclose(r.info.level_downsamples, p["level_downsamples"], rtol=1e-3)
        if p["mpp_x"] is None:
            assert r.info.mpp is None
        else:
            assert r.info.mpp == pytest.approx((float(p["mpp_x"]), float(p["mpp_y"])))


def test_missing_mpp_names_the_override(slides_dir):
    with (
        SlideReader(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs") as r,
        pytest.raises(MissingMPPError, match="--mpp"),
    ):
        _ = r.mpp
    with SlideReader(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp_override=0.25) as r:
        assert r.mpp == 0.25 and r.info.mpp_source == "override"


@pytest.mark.parametrize("name", ["broken.svs", "fixtures/unopenable.tiff"])
def test_unopenable_files_raise_clear_error(slides_dir, name):
    with pytest.raises(SlideReadError, match="cannot open as a slide") as e:
        SlideReader(slides_dir / name)
    assert name.split("/")[-1] in str(e.value)


def test_corrupt_tile_data_raises_on_read(slides_dir):
    with (
        SlideReader(slides_dir / "fixtures/unreadable.svs") as r,
        pytest.raises(SlideReadError, match="Bogus marker"),
    ):
        r.read_region(0, 0, 0, 16, 16)


def test_tiff_resolution_fallback_and_no_magnification_guess():
    mpp, src = mpp_from_properties(
        {
            "tiff.ResolutionUnit": "centimeter",
            "tiff.XResolution": "40000",
            "tiff.YResolution": "40000",
        }
    )
    assert mpp == pytest.approx((0.25, 0.25)) and src == "tiff.XResolution"
    # 72 dpi screen default is not a microscope resolution; objective power alone is never used.
    assert (
        mpp_from_properties(
            {
                "tiff.ResolutionUnit": "inch",
                "tiff.XResolution": "72",
                "tiff.YResolution": "72",
                "openslide.objective-power": "20",
            }
        )[0]
        is None
    )


def test_best_level_is_lowest_resolution_not_coarser_than_target(slides_dir, props):
    p = props["test3-DAPI-2-387.ndpi"]
    base = float(p["mpp_x"])
    with SlideReader(slides_dir / "test3-DAPI-2-387.ndpi") as r:
        for target in (0.23, 0.5, 1.0, 2.0, 4.0):
            ok = [i for i, d in enumerate(p["level_downsamples"]) if base * d <= target * 1.001]
            assert r.best_level_for_mpp(target) == max(ok)


def test_tissue_mask_rejects_pen_and_background():
    rng = np.random.default_rng(0)
    img = np.full((200, 200, 3), 240, np.uint8)
    yy, xx = np.mgrid[:200, :200]
    blob = (yy - 100) ** 2 + (xx - 80) ** 2 < 50**2
    img[blob] = (np.array([200, 120, 180]) + rng.integers(-15, 15, (blob.sum(), 3))).clip(0, 255)
    pen = (np.abs(xx - 170) < 4) & (yy > 20) & (yy < 180)
    img[pen] = (30, 60, 200)  # blue ink
    mask = tissue_mask(img, thumb_mpp=8.0)
    assert mask[blob].mean() > 0.95
    assert mask[pen].mean() == 0
    assert mask[~blob].mean() < 0.02


def test_area_fraction_equals_naive_count():
    rng = np.random.default_rng(1)
    mask = rng.random((50, 60)) > 0.5
    boxes = np.array([[0, 0, 10, 10], [5, 7, 25, 30], [50, 40, 60, 50], [55, 45, 70, 60]], float)
    got = area_fraction(mask, boxes)
    for (x0, y0, x1, y1), g in zip(boxes.astype(int), got):
        naive = mask[y0 : min(y1, 50), x0 : min(x1, 60)].sum() / ((x1 - x0) * (y1 - y0))
        assert g == pytest.approx(naive)


def _grid_for(r: SlideReader, target_mpp=0.5, patch=256, min_tissue=0.1, cfg=None):
    thumb, scale = r.thumbnail(512)
    mask = tissue_mask(thumb, scale * r.mpp, cfg or TissueConfig())
    return (
        thumb,
        mask,
        scale,
        make_tile_grid(
            r.info.width, r.info.height, r.mpp, mask, scale, target_mpp, patch, 0, min_tissue
        ),
    )


def test_tiles_inside_slide_on_tissue_and_grid_convention(sample_slide):
    with SlideReader(sample_slide) as r:
        _, _, _, g = _grid_for(r)
        w, h, mpp = r.info.width, r.info.height, r.mpp
    assert len(g) > 20
    assert g.coords.dtype == np.int64 and g.grid.dtype == np.int32
    assert (
        (g.coords >= 0).all()
        and (g.coords[:, 0] + g.extent_level0 <= w).all()
        and (g.coords[:, 1] + g.extent_level0 <= h).all()
    )
    assert g.extent_level0 == pytest.approx(256 * 0.5 / mpp)
    assert g.patch_size_level0 == round(256 * 0.5 / 0.499)
    np.testing.assert_array_equal(
        g.grid, np.floor((g.coords - g.coords.min(0)) / g.patch_size_level0)
    )
    # Independent check of "on tissue": tiles read straight through openslide are mostly stained.
    s = openslide.OpenSlide(str(sample_slide))
    stained = []
    for x, y in g.coords:
        tile = s.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB").resize((64, 64))
        stained.append((np.asarray(tile.convert("HSV"))[..., 1] > 25).mean())
    assert min(stained) > 0.03 and np.mean(stained) > 0.5


def test_tiles_are_exact_target_resolution(slides_dir):
    """A tile read at level 1 of the NDPI and resampled equals an independent level-0 read of
    the same physical square, resized with PIL."""
    path = slides_dir / "test3-DAPI-2-387.ndpi"
    with SlideReader(path) as r:
        mpp = r.mpp
        ext = 256 * 0.5 / mpp
        coords = np.array([[1200, 1500], [2000, 2600]], np.int64)
        from slidefm.wsi.tiling import TileGrid

        g = TileGrid(
            coords,
            np.zeros((2, 2), np.int32),
            np.ones(2, np.float32),
            256,
            0.5,
            mpp,
            ext,
            round(ext),
            0,
        )
        level = r.best_level_for_mpp(0.5)
        assert level == 1
        ds = TileRegionDataset(path, g, level, r.info.level_downsamples[level], region_tiles=8)
        _, tiles = ds[0]
    s = openslide.OpenSlide(str(path))
    for (x, y), tile in zip(coords, tiles):
        n = math.ceil(ext)
        ref = s.read_region((int(x), int(y)), 0, (n, n)).convert("RGB")
        ref = np.asarray(
            ref.resize((256, 256), Image.Resampling.BILINEAR, box=(0, 0, ext, ext))
        ).astype(float)
        assert tile.shape == (256, 256, 3)
        assert np.abs(tile.astype(float) - ref).mean() < 3.0


def test_region_reader_equals_per_tile_reads(sample_slide):
    """Cutting tiles from one region read gives the same pixels as reading each tile alone."""
    with SlideReader(sample_slide) as r:
        _, _, _, g = _grid_for(r)
    ds = TileRegionDataset(sample_slide, g, 0, 1.0, region_tiles=4)
    got = {}
    for idx, tiles in iter_tile_batches(tile_loader(ds, num_workers=2), 16):
        got.update({int(i): t.numpy() for i, t in zip(idx, tiles)})
    assert sorted(got) == list(range(len(g)))
    s = openslide.OpenSlide(str(sample_slide))
    ext = g.extent_level0
    for i in (0, len(g) // 2, len(g) - 1):
        x, y = g.coords[i]
        ref = s.read_region((int(x), int(y)), 0, (math.ceil(ext), math.ceil(ext))).convert("RGB")
        ref = np.asarray(ref.resize((256, 256), Image.Resampling.BILINEAR, box=(0, 0, ext, ext)))
        assert np.abs(got[i].astype(int) - ref.astype(int)).max() <= 2


def test_fluorescence_slide_has_no_brightfield_tissue(slides_dir):
    """The bright-field rule, forced, finds nothing on DAPI (auto mode: test_tissue.py)."""
    with (
        SlideReader(slides_dir / "test3-DAPI-2-387.ndpi") as r,
        pytest.raises(EmptyTissueError, match="tissue"),
    ):
        _grid_for(r, min_tissue=0.5, cfg=TissueConfig(mode="brightfield"))


def test_macenko_recovers_planted_stain_vectors():
    rng = np.random.default_rng(0)
    stains = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    stains /= np.linalg.norm(stains, axis=0)
    conc = np.stack([rng.gamma(2.0, 0.4, 4096), rng.gamma(2.0, 0.3, 4096)])
    od = stains @ conc
    rgb = np.clip(240 * np.exp(-od.T) - 1, 0, 255).astype(np.uint8).reshape(64, 64, 3)
    est = estimate_stains(rgb)
    assert est is not None
    cos = np.abs((est * stains).sum(axis=0))
    assert cos.min() > 0.98
    out = macenko_normalize(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    blank = np.full((32, 32, 3), 245, np.uint8)
    np.testing.assert_array_equal(macenko_normalize(blank), blank)
