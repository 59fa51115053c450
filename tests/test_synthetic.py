"""Synthetic cohort: real readable slides, planted truth that holds statistically, determinism."""

from __future__ import annotations

import dataclasses
import filecmp
import re

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
from scipy import ndimage
from skimage.color import rgb2hsv
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slidefm.cli import main
from slidefm.io.manifest import read_manifest
from slidefm.wsi.synthetic import (
    SUBTYPE_REPORT_TERMS,
    SUBTYPES,
    CohortOptions,
    generate_cohort,
    layout_of,
    plan_cohort,
    render_spec,
    slide_complete,
)
from slidefm.wsi.synthetic_layout import CELL_TYPES, IMMUNE, NECROSIS, RARE, STROMA, TUMOUR
from slidefm.wsi.synthetic_render import SITES, jitter_stain, render_slide
from slidefm.wsi.tissue import TissueConfig, tissue_mask

TINY = {"cells": 6, "cell_px": 64}


def balanced_accuracy(y, p) -> float:
    y, p = np.asarray(y), np.asarray(p)
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def cv_balanced_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return balanced_accuracy(y, cross_val_predict(model, x, y, cv=cv))


def naive_contacts(layout: np.ndarray) -> int:
    """Immune cells with a tumour/rare/necrosis cell among their 8 neighbours (plain loops)."""
    rows, cols = layout.shape
    n = 0
    for r in range(rows):
        for c in range(cols):
            if layout[r, c] != IMMUNE:
                continue
            nb = layout[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
            n += bool(np.isin(nb, (TUMOUR, RARE, NECROSIS)).any())
    return n


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    manifest = generate_cohort(out, 3, seed=5, workers=1, progress=False, **TINY)
    return out, manifest


def test_openslide_reads_mpp_dimensions_levels(tiny_cohort):
    out, manifest = tiny_cohort
    spec = plan_cohort(3, 5, CohortOptions(**TINY))[0]
    with openslide.OpenSlide(str(out / manifest.path[0])) as s:
        assert float(s.properties["openslide.mpp-x"]) == 0.5
        assert float(s.properties["openslide.mpp-y"]) == 0.5
        assert s.dimensions == (384, 384)
        assert s.level_count >= 3
        assert s.level_dimensions[1] == (192, 192) and s.level_dimensions[2] == (96, 96)
        got = np.asarray(s.read_region((0, 0), 0, (384, 384)).convert("RGB"), dtype=float)
    want = render_spec(spec, 5, CohortOptions(**TINY)).astype(float)
    assert np.abs(got - want).mean() < 4  # JPEG q85 of the same pixels
    assert np.abs(got - want[::-1]).mean() > 10  # …and not just any similar image


def test_manifest_columns_and_patient_splits(tiny_cohort):
    out, _ = tiny_cohort
    m = read_manifest(
        out / "manifest.csv",
        required=("slide_id", "case_id", "path", "subtype", "report", "split", "site"),
        check_paths=True,
    )
    assert set(m.subtype) <= set(SUBTYPES)
    assert set(m.biomarker_spatial) <= {0, 1} and set(m.biomarker_bag) <= {0, 1}
    gt = (out / "GROUND_TRUTH.md").read_text()
    assert "seed: `5`" in gt and "biomarker_spatial" in gt
    cells = pd.read_csv(out / "cells.csv")
    lay = layout_of(plan_cohort(3, 5, CohortOptions(**TINY))[1], 5, CohortOptions(**TINY))
    mine = cells[cells.slide_id == m.slide_id[1]]
    assert len(mine) == int((lay > 0).sum())
    assert all(CELL_TYPES[lay[r, c]] == t for r, c, t in zip(mine.row, mine.col, mine.cell_type))
    assert (mine.x == mine.col * 64).all() and (mine.y == mine.row * 64).all()


def test_byte_identical_across_workers_and_resume(tiny_cohort, tmp_path):
    ref, _ = tiny_cohort
    b = tmp_path / "b"
    generate_cohort(b, 3, seed=5, workers=2, progress=False, **TINY)
    names = ["manifest.csv", "cells.csv", "reports.csv", "GROUND_TRUTH.md"]
    names += [f"slides/{p.name}" for p in (ref / "slides").glob("*.tiff")]
    assert len(names) == 7
    _, mismatch, errors = filecmp.cmpfiles(ref, b, names, shallow=False)
    assert mismatch == [] and errors == []
    # Resume: a deleted slide is redrawn identically, the others are not rewritten.
    victim = b / names[4]
    keep = b / names[5]
    mtime = keep.stat().st_mtime_ns
    victim.unlink()
    generate_cohort(b, 3, seed=5, workers=1, progress=False, **TINY)
    assert filecmp.cmp(victim, ref / names[4], shallow=False)
    assert keep.stat().st_mtime_ns == mtime
    # A larger cohort keeps the first patients' plans; a changed plan is not "complete".
    opts = CohortOptions(**TINY)
    small, big = plan_cohort(3, 5, opts), plan_cohort(12, 5, opts)
    key = lambda x: (x.slide_id, x.subtype, x.biomarker_spatial, x.biomarker_bag, x.site)  # noqa: E731
    assert [key(a) for a in small[:2]] == [key(b) for b in big[:2]]
    spec = next(x for x in small if x.slide_id == victim.stem)
    assert slide_complete(victim, spec, 5, opts)
    other = "papillary" if spec.subtype != "papillary" else "small_cell"
    assert not slide_complete(victim, dataclasses.replace(spec, subtype=other), 5, opts)
    # Another seed is a different cohort: nothing is skipped by mistake.
    generate_cohort(b, 3, seed=6, workers=1, progress=False, **TINY)
    assert not filecmp.cmp(victim, ref / names[4], shallow=False)


def test_cohort_design():
    specs = plan_cohort(400, seed=1)
    df = pd.DataFrame([s.__dict__ for s in specs])
    per_case = df.groupby("case_id")
    assert per_case.size().between(1, 3).all() and per_case.size().nunique() == 3
    for col in ("subtype", "biomarker_spatial", "biomarker_bag", "site", "split"):
        assert (per_case[col].nunique() == 1).all(), col
    cases = per_case.first()
    assert set(cases.subtype) == set(SUBTYPES)
    # balanced design: every subtype × spatial × bag cell holds 1/16 of the patients (± 1 block)
    cell = cases.groupby(["subtype", "biomarker_spatial", "biomarker_bag"]).size()
    assert len(cell) == 16 and cell.max() - cell.min() <= 1
    share = cases.split.value_counts(normalize=True)
    assert abs(share["train"] - 0.6) < 0.05 and abs(share["test"] - 0.2) < 0.05


def test_spatial_biomarker_only_in_arrangement():
    """Cell-type counts do not separate the spatial label; immune–tumour contacts do."""
    opts = CohortOptions()
    specs = plan_cohort(300, seed=2, options=opts)
    lays = [layout_of(s, 2, opts) for s in specs]
    y = np.array([s.biomarker_spatial for s in specs])
    counts = np.stack([np.bincount(x.ravel(), minlength=len(CELL_TYPES)) for x in lays])
    assert cv_balanced_accuracy(counts.astype(float), y) < 0.65
    # Same count distributions: the mean immune count differs by far less than its spread.
    im = counts[:, IMMUNE]
    assert abs(im[y == 1].mean() - im[y == 0].mean()) < 0.25 * im.std()
    contacts = np.array([naive_contacts(x) for x in lays])
    assert balanced_accuracy(y, (contacts > 0).astype(int)) > 0.97
    # the bag label is readable from counts (fraction of rare tumour cells)
    yb = np.array([s.biomarker_bag for s in specs])
    frac = counts[:, RARE] / (counts[:, RARE] + counts[:, TUMOUR])
    assert balanced_accuracy(yb, (frac > 0.09).astype(int)) > 0.95


def test_tile_colour_histograms_do_not_separate_spatial():
    """Mean per-tile colour histograms (what a bag model sees) stay near chance for spatial
    and separate the bag label."""
    opts = CohortOptions(cells=12, cell_px=32, pen_prob=0.0)
    specs = plan_cohort(160, seed=3, options=opts)
    feats = []
    for s in specs:
        img = render_spec(s, 3, opts)
        lay = layout_of(s, 3, opts)
        tiles = img.reshape(12, 32, 12, 32, 3).transpose(0, 2, 1, 3, 4)[lay > 0]
        q = (tiles // 32).reshape(len(tiles), -1, 3)  # 8 bins per channel
        h = np.stack([np.stack([np.bincount(t[:, ch], minlength=8) for ch in range(3)]) for t in q])
        feats.append((h / q.shape[1]).mean(0).ravel())
    x = np.array(feats)
    y = np.array([s.biomarker_spatial for s in specs])
    yb = np.array([s.biomarker_bag for s in specs])
    assert cv_balanced_accuracy(x, y) < 0.65
    assert cv_balanced_accuracy(x, yb) > 0.75


def _texture_features(tile: np.ndarray) -> np.ndarray:
    """Brightness-normalised texture statistics of one RGB tile: bright (lumen/space) share,
    dark tail, contrast, and orientation coherence (structure tensor)."""
    g = tile.astype(float).mean(2)
    g = g / np.percentile(g, 99)
    gy, gx = ndimage.sobel(g, 0), ndimage.sobel(g, 1)
    jxx, jyy, jxy = (ndimage.uniform_filter(a, 9) for a in (gx * gx, gy * gy, gx * gy))
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9)
    return np.array(
        [(g > 0.92).mean(), np.percentile(g, 10), g.std(), coherence.mean(), np.median(g)]
    )


def test_subtypes_differ_in_tile_appearance():
    """A linear model on five texture statistics tells subtypes apart on held-out sites."""
    layout = np.full((3, 3), TUMOUR, dtype=np.int8)
    x, y, site = [], [], []
    for si, name in enumerate(sorted(SITES)):
        for k, st in enumerate(SUBTYPES):
            rng = np.random.default_rng([si, k])
            img = render_slide(layout, st, jitter_stain(SITES[name], rng), rng, 256)
            for t in (
                img.reshape(3, 256, 3, 256, 3).transpose(0, 2, 1, 3, 4).reshape(9, 256, 256, 3)
            ):
                x.append(_texture_features(t))
                y.append(k)
                site.append(si)
    x, y, site = np.array(x), np.array(y), np.array(site)
    acc = []
    for s in range(4):  # leave one site out
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(x[site != s], y[site != s])
        acc.append(balanced_accuracy(y[site == s], model.predict(x[site == s])))
    assert np.mean(acc) > 0.9


def test_tissue_detector_finds_exactly_the_tissue_cells():
    """slidefm.wsi.tissue keeps every tissue cell and rejects glass and pen ink."""
    opts = CohortOptions(pen_prob=1.0)
    for s in plan_cohort(4, seed=4, options=opts)[::2]:
        img = render_spec(s, 4, opts)
        thumb = img.reshape(768, 4, 768, 4, 3).mean((1, 3)).astype(np.uint8)  # 2 µm/px
        frac = tissue_mask(thumb, 2.0).reshape(12, 64, 12, 64).mean((1, 3))
        lay = layout_of(s, 4, opts)
        assert frac[lay > 0].min() > 0.9 and frac[lay == 0].max() < 0.1, s.slide_id
        # Ink is the only difference from the same slide drawn without pen, and lies on glass.
        ink = (img != render_spec(dataclasses.replace(s, pen_marks=0), 4, opts)).any(2)
        glass = np.repeat(np.repeat(lay == 0, 256, 0), 256, 1)
        assert ink.any() and not (ink & ~glass).any()


def test_no_tissue_pixel_looks_like_pen_ink():
    """Every tissue type, at every site and stain jitter, stays out of the detector's ink rule
    (green–blue hue with saturation, or near-black), so ink rejection never removes tissue."""
    cfg = TissueConfig()
    lo, hi = cfg.pen_hue_range
    for site in sorted(SITES):
        for code in (TUMOUR, STROMA, NECROSIS, IMMUNE, RARE):
            for j, st in enumerate(SUBTYPES if code == TUMOUR else SUBTYPES[:2]):
                rng = np.random.default_rng([j, code, len(site)])
                img = render_slide(
                    np.full((1, 1), code, np.int8), st, jitter_stain(SITES[site], rng), rng, 128
                )
                hsv = rgb2hsv(img.reshape(32, 4, 32, 4, 3).mean((1, 3)) / 255)
                ink = (
                    (hsv[..., 0] >= lo)
                    & (hsv[..., 0] <= hi)
                    & (hsv[..., 1] >= cfg.pen_min_saturation)
                )
                ink |= hsv[..., 2] < cfg.max_value_dark
                assert ink.mean() < 0.01, (site, CELL_TYPES[code], st)


FORBIDDEN = (
    "h&e image of",
    "whole slide image",
    "histopathology of",
    "microscopy slide",
    "this slide shows",
)


def test_reports_use_synonyms_not_prompt_phrasing():
    specs = plan_cohort(1, 0)
    assert specs  # the cohort API is importable and non-empty
    from slidefm.wsi.synthetic_reports import make_report

    hits, texts = 0, []
    for i in range(400):
        st = SUBTYPES[i % 4]
        rng = np.random.default_rng(i)
        text = make_report(rng, st, i % 2, (i // 2) % 2, 1 + i % 3)
        texts.append(text)
        low = text.lower()
        hits += any(t.lower() in low for t in SUBTYPE_REPORT_TERMS[st])
        assert not any(f in low for f in FORBIDDEN), text
        terms = [t.lower() for terms in SUBTYPE_REPORT_TERMS.values() for t in terms]
        assert not any(re.search(re.escape(t) + r" tissue\b", low) for t in terms)
    assert hits / 400 > 0.8  # most keep an intact term; OCR noise breaks some
    assert len(set(texts)) == 400
    used = {t for t in (SUBTYPE_REPORT_TERMS[st] for st in SUBTYPES) for t in t}
    seen = {t for t in used if any(t.lower() in x.lower() for x in texts)}
    assert len(seen) >= 0.9 * len(used)  # synonyms are actually varied
    assert sum("[" in x for x in texts) > 300  # de-identification placeholders
    assert sum(bool(re.search(r"[|~^»_]", x)) for x in texts) > 40  # OCR-like noise


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["synth-cohort", "--out", str(out), "--n-slides", "2", "--seed", "9"]
    assert main([*argv, "--config", "tiny", "--workers", "1", "--no-progress"]) == 0
    assert '"slides": 2' in capsys.readouterr().out
    assert len(list((out / "slides").glob("*.tiff"))) == 2
    assert main([*argv, "--cells", "4", "--no-progress"]) == 2  # user error, clear message
    assert "--cells must be" in capsys.readouterr().err


def test_encode_slides_tiles_are_cells(tmp_path):
    """encode-slides on a synthetic slide: one tile per tissue cell, at the cell's corner."""
    out = tmp_path / "c"
    generate_cohort(out, 1, seed=11, workers=1, progress=False, cells=6, pen_prob=1.0)
    feats = tmp_path / "f"
    argv = ["encode-slides", "--manifest", str(out / "manifest.csv"), "--out", str(feats)]
    argv += ["--encoder", "vit_tiny_dev", "--weights", "random", "--no-qc", "--no-progress"]
    assert main([*argv, "--num-workers", "0"]) == 0
    cells = pd.read_csv(out / "cells.csv")
    (h5,) = feats.glob("*.h5")
    with h5py.File(h5) as f:
        coords = {tuple(c) for c in f["coords"][:].tolist()}
    assert coords == set(zip(cells.x, cells.y))
