"""The viewer in a real browser: Debian's headless Chromium, driven by Playwright, opens the
bundled slide with a MIL heatmap, waits for every tile, and checks the pixels on screen.

It never skips: without Chromium or Playwright it fails with the install command (``.ci/run``
installs both). ``SLIDEFM_VIEWER_SCREENSHOT=PATH`` also writes the screenshot there (the
README's image comes from this test).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from tests.viewer_utils import make_features, make_mil, viewer_args

CHROMIUM = os.environ.get("SLIDEFM_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get install -y chromium && pip install playwright"
OPACITY = 0.6

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(sample_slide, tmp_path_factory):
    import uvicorn

    from slidefm.viewer.app import create_app
    from slidefm.viewer.build import build_viewer

    root = tmp_path_factory.mktemp("browser")
    sid = "CMU-1-Small-Region"
    feats = make_features(sample_slide, root, sid)
    mil = make_mil(root)
    v = build_viewer(viewer_args(slide=sample_slide, features=feats, mil=mil))
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(v), host="127.0.0.1", port=port, log_level="warning")
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30 or not th.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield {
        "url": f"http://127.0.0.1:{port}",
        "sid": sid,
        "features": feats,
        "mil": mil,
        "viewer": v,
    }
    srv.should_exit = True
    th.join(10)


def _browser(p):
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"Chromium not found at {CHROMIUM}: {INSTALL} (or set SLIDEFM_CHROMIUM)")
    return p.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
    )


def _wait_ready(page) -> None:
    page.wait_for_function("() => window.slidefmReady && window.slidefmReady()", timeout=60_000)
    page.wait_for_timeout(800)  # let the opening animation settle, then wait again
    page.wait_for_function("() => window.slidefmReady()", timeout=60_000)


def _screen(page, path: Path) -> np.ndarray:
    page.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def _to_screen(page, pts: np.ndarray) -> np.ndarray:
    """Level-0 image points (N, 2) → page pixel coordinates, through OpenSeadragon."""
    return np.asarray(
        page.evaluate(
            """(pts) => { const v = window.slidefmViewer, r = v.element.getBoundingClientRect();
               return pts.map(([x, y]) => { const q = v.viewport.imageToViewerElementCoordinates(
                 new OpenSeadragon.Point(x, y)); return [q.x + r.left, q.y + r.top]; }); }""",
            pts.tolist(),
        )
    )


def _patch(img: np.ndarray, xy, r: int = 2) -> np.ndarray:
    x, y = (int(round(v)) for v in xy)
    return img[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(0)


def test_heatmap_and_slide_pixels_in_chromium(server, sample_slide, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL}")
    from slidefm.models.mil import load_mil_checkpoint
    from slidefm.wsi.reader import SlideReader

    with h5py.File(server["features"]) as f:
        coords, s = f["coords"][()], float(f.attrs["patch_size_level0"])
        feats, grid = f["features"][()], f["grid"][()].astype(np.int64)
    model, _ = load_mil_checkpoint(server["mil"])
    with torch.no_grad():
        att = model(torch.from_numpy(feats)[None], torch.from_numpy(grid)[None])["attention"][0]
    att = att.numpy()
    hot, cold = int(att.argmax()), int(att.argmin())
    centres = coords + s / 2
    jet = matplotlib.colormaps["jet"]

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        url = f"{server['url']}/slide/{server['sid']}?overlay=mil&opacity={OPACITY}"
        page.goto(url)
        _wait_ready(page)
        shot = tmp_path / "viewer.png"
        on = _screen(page, shot)
        panel = page.inner_text("#panel")
        xy = _to_screen(page, np.concatenate([centres, [[2, 2], [2219, 2966]]]))
        # overlay off: the same view shows the slide alone
        page.uncheck("#ov-mil")
        _wait_ready(page)
        off = _screen(page, tmp_path / "slide_only.png")
        out = os.environ.get("SLIDEFM_VIEWER_SCREENSHOT")
        if out:
            page.check("#ov-mil")
            _wait_ready(page)
            page.screenshot(path=out, type="jpeg", quality=70)
        browser.close()
    assert not errors, errors
    assert "RANDOM WEIGHTS" in panel and "aperio" in panel and "openslide.mpp" in panel

    # 1. slide pixels: the displayed image equals OpenSlide's thumbnail of the same extent
    (x0, y0), (x1, y1) = xy[-2], xy[-1]
    x0, y0, x1, y1 = int(np.ceil(x0)), int(np.ceil(y0)), int(np.floor(x1)), int(np.floor(y1))
    with SlideReader(sample_slide) as r:
        ref = np.asarray(
            r.read_region_image(0, 0, 0, r.info.width, r.info.height).resize(
                (x1 - x0, y1 - y0), Image.Resampling.BOX
            )
        ).astype(np.float64)
    shown = off[y0:y1, x0:x1]
    assert shown.std() > 20  # real tissue, not a blank canvas
    assert np.abs(shown - ref).mean() < 12, np.abs(shown - ref).mean()

    # 2. heatmap pixels: α·jet(rank) blended over the slide exactly where the tiles are
    for i, value in ((hot, 1.0), (cold, 0.0)):
        want = (1 - OPACITY) * _patch(off, xy[i]) + OPACITY * 255 * np.asarray(jet(value)[:3])
        np.testing.assert_allclose(_patch(on, xy[i]), want, atol=14)
    hot_px, cold_px = _patch(on, xy[hot]), _patch(on, xy[cold])
    assert hot_px[0] > hot_px[2] + 40 and cold_px[2] > cold_px[0] + 40  # red vs blue
    # a point on glass, outside every tile, is unchanged by the overlay
    assert not ((coords[:, 0] <= 20) & (coords[:, 1] <= 20)).any()
    g = xy[-2] + np.array([20.0, 20.0]) * (xy[-1] - xy[-2]) / [2219, 2966]
    np.testing.assert_allclose(_patch(on, g), _patch(off, g), atol=3)


@pytest.fixture(scope="module")
def cohort_server(sample_slide, shared_data, tmp_path_factory):
    import pandas as pd
    import uvicorn

    from slidefm.viewer.app import create_app
    from slidefm.viewer.build import build_viewer
    from tests.viewer_utils import make_cohort

    texts = pd.read_csv(shared_data / "reports" / "tcga_reports_val.csv")["text"][:40].tolist()
    c = make_cohort(sample_slide, tmp_path_factory.mktemp("cohort"), texts)
    v = build_viewer(viewer_args(**c))
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(v), host="127.0.0.1", port=port, log_level="warning")
    )
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        if not th.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", **c}
    srv.should_exit = True
    th.join(10)


def test_cohort_table_sorts_and_opens_slides(cohort_server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed: {INSTALL}")
    with h5py.File(cohort_server["features"] / "good2.h5") as f:
        x, y = f["coords"][0]
        s = float(f.attrs["patch_size_level0"])
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(cohort_server["url"] + "/")
        page.wait_for_selector("#cohort tbody tr")

        def ids() -> list[str]:
            return page.eval_on_selector_all("#cohort tbody tr", "rs => rs.map(r => r.dataset.id)")

        assert ids() == ["corrupt", "good", "good2", "missing"]  # sorted by slide id
        page.click("#cohort th[data-key='slide_id']")
        assert ids() == ["missing", "good2", "good", "corrupt"]
        page.click("#cohort th[data-key='l:subtype']")
        assert ids()[-1] == "missing"  # spindle_cell sorts last
        text = page.inner_text("#cohort")
        assert "cannot open" in text and "encode-slides:" in text and "[random weights]" in text
        page.wait_for_function(
            "() => [...document.querySelectorAll('#cohort img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.click("#cohort tr[data-id='good2']")
        page.wait_for_url("**/slide/good2")
        _wait_ready(page)
        page.check("#ov-tiles")
        _wait_ready(page)
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        (ex, ey), (cx, cy) = _to_screen(page, np.array([[x, y + s / 2], [x + s / 2, y + s / 2]]))
        panel = page.inner_text("#panel")
        page.goto(cohort_server["url"] + "/slide/corrupt")
        page.wait_for_selector("#error:not([hidden])")
        corrupt = page.inner_text("#error")
        browser.close()
    assert not errors, errors
    assert "Retrieved reports" in panel and "cos" in panel and "small_cell" in panel
    # the first kept tile's left edge is drawn in the grid colour, its centre is untouched
    edge = shot[
        int(round(ey)) - 1 : int(round(ey)) + 2, int(np.floor(ex)) - 1 : int(np.ceil(ex)) + 2
    ]
    assert (np.abs(edge - np.array([30, 60, 220])).sum(-1) < 60).any()
    centre = shot[int(round(cy)), int(round(cx))]
    assert np.abs(centre.astype(int) - [30, 60, 220]).sum() > 60
    assert "cannot open" in corrupt
