"""Online patching: tissue-only draws, exact µm/px, determinism across worker counts, resume,
area weighting, bad slides."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from slidefm.wsi.online import OnlinePatchConfig, OnlinePatchDataset, prepare_slides
from slidefm.wsi.synthetic import CohortOptions, generate_cohort, plan_cohort, render_spec
from slidefm.wsi.synthetic_tiff import write_pyramid_tiff

pytestmark = pytest.mark.usefixtures("one_thread")
OPTS = {"cells": 6, "cell_px": 256}
CELL = OPTS["cell_px"]


@dataclasses.dataclass
class Job:
    slide_id: str
    path: str
    mpp: float | None = None


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    man = generate_cohort(out, 3, seed=3, workers=1, progress=False, **OPTS)
    jobs = [Job(r.slide_id, str(out / r.path)) for r in man.itertuples()]
    return out, man, jobs


CFG = OnlinePatchConfig(patch_size=32, mpps=(0.5, 1.0), min_tissue=0.6, samples_per_epoch=64)


def test_draws_land_on_true_tissue(cohort):
    out, _, jobs = cohort
    slides, skipped = prepare_slides(jobs, CFG)
    assert not skipped and len(slides) == 3
    cells = pd.read_csv(out / "cells.csv")
    ds = OnlinePatchDataset(slides, CFG, seed=0)
    hits = []
    for i in range(200):
        d = ds.draw(ds.rng(i))
        sid = slides[d.slide].slide_id
        cx, cy = d.x + d.extent_level0 / 2, d.y + d.extent_level0 / 2
        truth = cells[(cells.slide_id == sid)]
        inside = (
            (truth.x <= cx) & (cx < truth.x + CELL) & (truth.y <= cy) & (cy < truth.y + CELL)
        ).any()
        hits.append(bool(inside))
        assert d.mpp in (0.5, 1.0)
        assert d.extent_level0 == pytest.approx(32 * d.mpp / 0.5)
    assert np.mean(hits) > 0.9  # mask border pixels may sit just outside the true cells


def test_patch_pixels_match_the_rendered_slide_at_target_mpp(cohort):
    """A 1.0-µm/px patch equals the 2×2-averaged truth render (JPEG noise only)."""
    _, _, jobs = cohort
    slides, _ = prepare_slides(jobs[:1], CFG)
    ds = OnlinePatchDataset(slides, dataclasses.replace(CFG, mpps=(1.0,)), seed=1)
    spec = plan_cohort(3, 3, CohortOptions(**OPTS))[0]
    truth = render_spec(spec, 3, CohortOptions(**OPTS)).astype(np.float64)
    for i in range(5):
        d = ds.draw(ds.rng(i))
        got = ds.read(d).astype(np.float64)
        ref = truth[d.y : d.y + 64, d.x : d.x + 64].reshape(32, 2, 32, 2, 3).mean((1, 3))
        assert got.shape == (32, 32, 3)
        assert np.abs(got - ref).mean() < 12, i
    ds.close()


def _collect(ds, workers, epoch=0, start=0):
    from slidefm.train.data import ResumableSampler

    ds.set_epoch(epoch)
    sampler = ResumableSampler(ds, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    sampler.set_start(start)
    dl = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers)
    return torch.cat([torch.as_tensor(b) for b in dl])


def test_deterministic_for_any_worker_count_and_resumable(cohort):
    _, _, jobs = cohort
    slides, _ = prepare_slides(jobs, CFG)
    ds = OnlinePatchDataset(slides, CFG, seed=5)
    a = _collect(ds, 0)
    b = _collect(ds, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, _collect(ds, 0, epoch=1))  # a new epoch = new draws
    assert torch.equal(_collect(ds, 0, start=24), a[24:])  # resume mid-epoch
    other = OnlinePatchDataset(slides, CFG, seed=6)
    assert not torch.equal(a, _collect(other, 0))


def test_area_weighting_vs_uniform(cohort):
    _, _, jobs = cohort
    slides, _ = prepare_slides(jobs, CFG)
    area = np.array([s.tissue_area_um2 for s in slides])
    for weighting, expect in (("area", area / area.sum()), ("uniform", np.full(3, 1 / 3))):
        ds = OnlinePatchDataset(slides, dataclasses.replace(CFG, weighting=weighting), seed=0)
        counts = np.bincount([ds.draw(ds.rng(i)).slide for i in range(3000)], minlength=3)
        assert np.allclose(counts / 3000, expect, atol=0.03), weighting


def test_bad_slides_are_reported_and_skipped(cohort, tmp_path, slides_dir):
    _, _, jobs = cohort
    blank = tmp_path / "blank.tiff"
    write_pyramid_tiff(blank, np.full((512, 512, 3), 245, np.uint8))
    bad = [
        Job("blank", str(blank)),
        Job("nompp", str(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs")),
        Job("broken", str(slides_dir / "broken.svs")),
    ]
    slides, skipped = prepare_slides(jobs[:1] + bad, CFG)
    assert [s.slide_id for s in slides] == [jobs[0].slide_id]
    why = dict(skipped)
    assert why["blank"] == "no tissue detected"
    assert "--mpp" in why["nompp"] and "broken" in why
    with pytest.raises(ValueError, match="no usable slide"):
        prepare_slides(bad, CFG)
