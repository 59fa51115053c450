"""``slidefm view`` API: deep zoom equals OpenSlide's generator, overlays sit on the feature
file's level-0 boxes, scores match independent computations, bad requests never reach a 500."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from scipy.stats import rankdata

from slidefm.viewer.app import create_app
from slidefm.viewer.build import build_viewer
from tests.viewer_utils import make_cohort, viewer_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(sample_slide, shared_data, tmp_path_factory):
    texts = pd.read_csv(shared_data / "reports" / "tcga_reports_val.csv")["text"][:40].tolist()
    return make_cohort(sample_slide, tmp_path_factory.mktemp("viewer"), texts)


@pytest.fixture(scope="module")
def viewer(inputs):
    v = build_viewer(viewer_args(**inputs))
    yield v
    v.cohort.close()


@pytest.fixture(scope="module")
def client(viewer):
    return TestClient(create_app(viewer), raise_server_exceptions=False)


def png(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def test_dzi_matches_openslide_levels(client, sample_slide):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    osr = openslide.OpenSlide(str(sample_slide))
    dz = DeepZoomGenerator(osr, 254, 1, False)
    r = client.get("/dz/good/slide.dzi")
    assert r.status_code == 200
    root = ET.fromstring(r.text)
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    w, h = int(size.get("Width")), int(size.get("Height"))
    assert (w, h) == osr.dimensions
    ts, ov = int(root.get("TileSize")), int(root.get("Overlap"))
    assert (ts, ov, root.get("Format")) == (254, 1, "jpeg")
    # the pyramid a DZI client derives (halving, ceil) is OpenSlide's, level by level
    n = int(np.ceil(np.log2(max(w, h)))) + 1
    assert n == dz.level_count
    for lv in range(n):
        d = 2 ** (n - 1 - lv)
        assert (int(np.ceil(w / d)), int(np.ceil(h / d))) == dz.level_dimensions[lv]
        tc, tr = dz.level_tiles[lv]
        got = Image.open(
            io.BytesIO(client.get(f"/dz/good/slide_files/{lv}/{tc - 1}_{tr - 1}.png").content)
        )
        assert got.size == dz.get_tile(lv, (tc - 1, tr - 1)).size
    for lv, dims in enumerate(osr.level_dimensions):  # each OpenSlide level is a DZ level
        d = osr.level_downsamples[lv]
        assert dz.level_dimensions[n - 1 - int(round(np.log2(d)))] == dims
    osr.close()


def test_tile_pixels_equal_deepzoom_generator(client, sample_slide):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    osr = openslide.OpenSlide(str(sample_slide))
    dz = DeepZoomGenerator(osr, 254, 1, False)
    top = dz.level_count - 1
    for lv, (c, r) in [(top, (3, 5)), (top, (0, 0)), (top - 2, (1, 1)), (5, (0, 0))]:
        want = np.asarray(dz.get_tile(lv, (c, r)).convert("RGB"))
        got = png(client.get(f"/dz/good/slide_files/{lv}/{c}_{r}.png"))
        np.testing.assert_array_equal(got, want)
        jpg = png(client.get(f"/dz/good/slide_files/{lv}/{c}_{r}.jpeg")).astype(float)
        assert np.abs(jpg - want).mean() < 10  # JPEG q80 of the same pixels (PNG is exact)
    osr.close()


def test_overlay_boxes_are_feature_file_boxes(client, inputs):
    with h5py.File(inputs["features"] / "good.h5") as f:
        coords, s = f["coords"][()], float(f.attrs["patch_size_level0"])
    d = client.get("/api/slides/good/overlays/tiles.json").json()
    want = np.concatenate([coords, coords + s], 1)
    np.testing.assert_array_equal(np.asarray(d["boxes"]), want)
    fc = client.get("/api/slides/good/overlays/mil.geojson").json()
    for (x, y), feat in zip(coords.tolist(), fc["features"]):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        assert np.allclose(feat["geometry"]["coordinates"][0], ring)


def test_overlay_pixels_sit_on_level0_boxes(client, viewer, inputs):
    """At the full-resolution Deep Zoom level (1 px = 1 level-0 px) the tile-grid outline runs
    along each box's edges and the MIL heatmap is jet(rank of the attention) inside it."""
    from slidefm.models.mil import load_mil_checkpoint

    with h5py.File(inputs["features"] / "good.h5") as f:
        coords, s = f["coords"][()], int(f.attrs["patch_size_level0"])
        feats, grid = f["features"][()], f["grid"][()]
    model, _ = load_mil_checkpoint(inputs["mil"])
    with torch.no_grad():
        att = model(torch.from_numpy(feats)[None], torch.from_numpy(grid.astype(np.int64))[None])
    att = att["attention"][0].numpy()
    rank = (rankdata(att, method="ordinal") - 1) / (len(att) - 1)
    top = viewer.geometry("good").level_count - 1
    jet = matplotlib.colormaps["jet"]
    for i in [int(np.argmax(att)), int(np.argmin(att)), 7]:
        x, y = coords[i]
        cx, cy = x + s // 2, y + s // 2  # box centre, away from tile overlap
        col, row = cx // 254, cy // 254
        ox, oy = col * 254 - (col > 0), row * 254 - (row > 0)
        heat = png(client.get(f"/dz/good/mil_files/{top}/{col}_{row}.png"))
        want = np.rint(np.asarray(jet(rank[i])[:3]) * 255)
        np.testing.assert_array_equal(heat[cy - oy, cx - ox, :3], want)
        assert heat[cy - oy, cx - ox, 3] == 255
        lines = png(client.get(f"/dz/good/tiles_files/{top}/{col}_{row}.png"))
        if ox <= x < ox + lines.shape[1]:
            assert lines[cy - oy, x - ox, 3] == 255  # left edge drawn
        assert lines[cy - oy, cx - ox, 3] == 0  # inside: transparent
    glass = png(client.get(f"/dz/good/mil_files/{top}/0_0.png"))  # no tile covers (0, 0)
    assert not ((coords[:, 0] <= 0) & (coords[:, 1] <= 0)).any() and glass[0, 0, 3] == 0


def test_bad_requests_are_400_or_404_never_500(client):
    bad = [
        "/dz/..%2F..%2Fetc%2Fpasswd/slide.dzi",
        "/dz/%2e%2e/slide.dzi",
        "/api/slides/..%2Fgood/thumbnail.jpg",
        "/api/slides/nope",
        "/slide/nope",
        "/static/../pipelines/view.py",
        "/static/%2e%2e/app.py",
        "/dz/good/slide_files/999/0_0.jpeg",
        "/dz/good/slide_files/12/99999_0.jpeg",
        "/dz/good/slide_files/12/0_99999.png",
        "/dz/good/slide_files/-1/0_0.jpeg",
        "/dz/good/slide_files/12/0_0.gif",
        "/dz/good/slide_files/12/x_0.jpeg",
        "/dz/good/slide_files/12/1234567890123_0.jpeg",
        "/dz/good/secret_files/12/0_0.png",
        "/dz/good/zs9_files/12/0_0.png",
        "/dz/good/mil.xml",
        "/dz/good/..%2Fslide.dzi",
        "/dz/corrupt/slide.dzi",
        "/dz/corrupt/slide_files/0/0_0.jpeg",
        "/dz/missing/slide_files/0/0_0.jpeg",
        "/api/slides/good/overlays/nope.json",
        "/api/slides/good/overlays/mil.csv",
        "/api/slides/good/thumbnail.jpg?size=100000",
        "/api/slides/corrupt/overlays/mil.geojson",
    ]
    for u in bad:
        r = client.get(u)
        assert r.status_code in (400, 404, 422), (u, r.status_code, r.text)
    r = client.get("/static/openseadragon/LICENSE.txt")  # package data, BSD licence shipped
    assert r.status_code == 200 and "Redistribution" in r.text


def test_cohort_shows_errors_and_good_slides_work(client):
    rows = {r["slide_id"]: r for r in client.get("/api/cohort").json()["slides"]}
    assert list(rows) == ["good", "good2", "corrupt", "missing"]
    assert "cannot open" in rows["corrupt"]["open_error"]
    assert "cannot open" in rows["corrupt"]["encode_error"]  # from errors.csv
    assert "not found" in rows["missing"]["open_error"]
    assert rows["good"]["open_error"] is None and rows["good"]["labels"] == {
        "subtype": "adenocarcinoma"
    }
    assert rows["good"]["mil"]["random_weights"] is True
    assert client.get("/dz/good2/slide_files/10/0_0.jpeg").status_code == 200
    assert client.get("/api/slides/good/thumbnail.jpg").headers["content-type"] == "image/jpeg"
    page = client.get("/")
    assert page.status_code == 200 and "cohort.js" in page.text
    info = client.get("/api/slides/corrupt").json()
    assert info["open_error"] and "properties" not in info


def test_side_panel_numbers_match_independent_computation(client, inputs):
    from slidefm.eval.zero_shot import load_prompts
    from slidefm.models.clip import SlideTextModel
    from slidefm.models.mil import load_mil_checkpoint

    info = client.get("/api/slides/good").json()
    p = info["properties"]
    assert (p["vendor"], p["mpp_source"], p["width"]) == ("aperio", "openslide.mpp", 2220)
    assert p["mpp"] == pytest.approx([0.499, 0.499])
    with h5py.File(inputs["features"] / "good.h5") as f:
        feats = torch.from_numpy(f["features"][()])[None]
        grid = torch.from_numpy(f["grid"][()].astype(np.int64))[None]
    model, _ = load_mil_checkpoint(inputs["mil"])
    with torch.no_grad():
        prob = torch.softmax(model(feats, grid)["logits"][0], -1).numpy()
    assert info["mil"]["probabilities"]["pos"] == pytest.approx(float(prob[1]), rel=1e-5)
    assert info["mil"]["prediction"] == ["neg", "pos"][int(prob.argmax())]
    align = SlideTextModel.from_checkpoint(inputs["align"])
    with torch.no_grad():
        emb = align.slide_encoder(feats, grid)
        zs = align.zero_shot(emb, load_prompts(inputs["prompts"]))[0].numpy()
        z = align.encode_slide(embeddings=emb)[0].numpy()
        zr = align.embed_texts(pd.read_csv(inputs["manifest"])["report"].tolist()).numpy()
    got = info["zero_shot"]["probabilities"]
    assert [got["adenocarcinoma"], got["small_cell"]] == pytest.approx(zs.tolist(), rel=1e-4)
    assert info["zero_shot"]["random_weights"] is True
    sims = zr @ z
    top = info["retrieval"]
    assert [r["case_id"] for r in top] == [f"c{i}" for i in np.argsort(-sims)[:3]]
    assert top[0]["similarity"] == pytest.approx(float(sims.max()), rel=1e-4)
    assert set(info["overlays"]) == {"tissue", "tiles", "mil", "zs0", "zs1"}


def test_scores_once_per_slide_and_concurrent_tiles(client, viewer):
    before = viewer.scores.computed
    urls = [
        f"/dz/good/{ly}_files/12/{c}_{r}.png"
        for ly in ("mil", "zs1")
        for c in range(4)
        for r in range(4)
    ]
    urls += [f"/dz/good/slide_files/12/{c}_{r}.jpeg" for c in range(8) for r in range(8)]
    seq = [client.get(u).content for u in urls]
    viewer.tiles.clear()
    with ThreadPoolExecutor(8) as ex:
        par = list(ex.map(lambda u: client.get(u), urls))
    assert all(r.status_code == 200 for r in par)
    assert [r.content for r in par] == seq
    assert viewer.scores.computed == before  # already computed for "good" by earlier requests


def test_tissue_outline_follows_mask(client, viewer):
    mask, scale = viewer.tissue("good")
    top = viewer.geometry("good").level_count - 1
    lv = top - 3  # 1 px = 8 level-0 px
    img = png(client.get(f"/dz/good/tissue_files/{lv}/0_0.png"))
    edge = img[..., 3] == 255
    assert edge.any() and edge.mean() < 0.2
    # every outline pixel lies on tissue next to non-tissue (within the 2-px width)
    ys, xs = np.nonzero(edge)
    mx = np.clip(((xs + 0.5) * 8 / scale).astype(int), 0, mask.shape[1] - 1)
    my = np.clip(((ys + 0.5) * 8 / scale).astype(int), 0, mask.shape[0] - 1)
    assert mask[my, mx].all()


def test_cli_defaults_to_localhost():
    from slidefm.cli import build_parser

    a = build_parser().parse_args(["view", "slide.svs"])
    assert a.host == "127.0.0.1" and a.func.__module__ == "slidefm.pipelines.view"
