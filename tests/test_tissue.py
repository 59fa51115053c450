"""Tissue detection on real slides: border glass is never a hole; fluorescence is detected and
its tissue found (issue 17). References are pixel statistics read straight through OpenSlide."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from slidefm.wsi.reader import SlideReader
from slidefm.wsi.tiling import make_tile_grid
from slidefm.wsi.tissue import TissueConfig, detect_modality, fill_interior_holes, tissue_mask


def _grid(path, mpp=None, cfg=None):
    with SlideReader(path, mpp_override=mpp) as r:
        m = r.mpp
        thumb, scale = r.thumbnail(round(max(r.info.width, r.info.height) * m / 8.0))
        mask = tissue_mask(thumb, scale * m, cfg or TissueConfig())
        return thumb, make_tile_grid(r.info.width, r.info.height, m, mask, scale, 0.5, 256)


def test_glass_touching_the_border_is_not_filled(slides_dir):
    """TCGA slide (0.25 µm/px given): the tile at level-0 (3584, 0) is blank glass (RGB ≈ 254)
    that today's hole filling counted as 100 % tissue."""
    path = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    s = openslide.OpenSlide(str(path))
    blank = np.asarray(s.read_region((3584, 0), 0, (512, 512)).convert("RGB"), float)
    assert blank.mean() > 250  # the reference: this square is glass
    _, g = _grid(path, mpp=0.25)
    hit = (g.coords == [3584, 0]).all(axis=1)
    assert not hit.any() or g.tissue_fraction[hit][0] < 0.1
    # Every kept tile is mostly not glass, judged from its own pixels.
    for x, y in g.coords[:: max(1, len(g) // 12)]:
        tile = np.asarray(s.read_region((int(x), int(y)), 0, (512, 512)).convert("L"), float)
        assert (tile < 220).mean() > 0.05


def test_interior_holes_filled_border_ones_kept():
    mask = np.ones((40, 40), bool)
    mask[10:14, 10:14] = False  # interior hole, 16 px
    mask[0:4, 20:24] = False  # same size, touches the top edge
    out = fill_interior_holes(mask, max_size=20)
    assert out[10:14, 10:14].all() and not out[0:4, 20:24].any()
    assert not fill_interior_holes(mask, max_size=10)[10:14, 10:14].any()  # too big to fill


def test_modality_detection(slides_dir, sample_slide):
    for path, want in (
        (slides_dir / "test3-DAPI-2-387.ndpi", "fluorescence"),
        (sample_slide, "brightfield"),
        (slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", "brightfield"),
    ):
        with SlideReader(path, mpp_override=0.25 if "TCGA" in path.name else None) as r:
            thumb, _ = r.thumbnail(256)
        assert detect_modality(thumb) == want, path.name
    with pytest.raises(ValueError, match="brightfield, fluorescence"):
        TissueConfig(mode="darkfield")


def test_fluorescence_slide_is_tiled_on_its_signal(slides_dir):
    """DAPI NDPI: auto mode finds tissue (was EmptyTissueError); kept tiles carry nuclear
    signal well above the dark background, tiles outside the mask do not."""
    path = slides_dir / "test3-DAPI-2-387.ndpi"
    _, g = _grid(path)
    assert len(g) >= 20
    s = openslide.OpenSlide(str(path))
    ext = int(round(g.extent_level0))

    def signal(x, y):  # fraction of bright pixels (channel max > 60) in a level-2 read
        ds = s.level_downsamples[2]
        a = np.asarray(s.read_region((int(x), int(y)), 2, (int(ext / ds),) * 2).convert("RGB"))
        return (a.max(axis=2) > 60).mean()

    kept = [signal(x, y) for x, y in g.coords[:: max(1, len(g) // 10)]]
    w, h = s.dimensions
    lattice = {(int(x), int(y)) for x, y in g.coords}
    outside = [
        signal(x, y)
        for x in range(0, w - ext, g.stride_level0)
        for y in range(0, h - ext, g.stride_level0)
        if (x, y) not in lattice
    ]
    assert np.mean(kept) > 0.05 and np.mean(kept) > 3 * np.mean(outside)
