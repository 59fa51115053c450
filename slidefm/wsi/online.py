"""Online patching: random patches cut from whole-slide images while training, nothing on disk.

kaiko.ai's recipe: instead of pre-extracting tiles, every training sample is a fresh draw of
(slide, random level-0 position inside tissue, µm/px from a configured set), read from the
pyramid at exactly that resolution. Tissue masks are computed once per slide with the same
detector as ``encode-slides``. Item ``i`` of epoch ``e`` depends only on (seed, e, i), so a run
is deterministic for any worker count, and the trainer's ``ResumableSampler`` (epoch + batch
position, saved in every checkpoint) resumes it mid-epoch. Slides are opened once per
DataLoader worker and reused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from slidefm.config import from_dict
from slidefm.wsi.patches import read_patch
from slidefm.wsi.reader import SlideReader, SlideReadError
from slidefm.wsi.tissue import TissueConfig, area_fraction, slide_tissue_mask

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnlinePatchConfig:
    """What one online patch is. Sizes are output px at the drawn µm/px."""

    patch_size: int = 128
    mpps: tuple[float, ...] = (0.5,)  # µm/px drawn uniformly per patch
    weighting: str = "area"  # area: slides drawn ∝ tissue area; uniform: each slide equally
    min_tissue: float = 0.6  # tissue fraction a patch needs (mask), else redrawn
    max_tries: int = 20  # redraws before keeping the most tissue-covered candidate
    samples_per_epoch: int = 10_000
    max_upsample: float = 1.1  # level-0 µm/px may exceed the finest target by this factor
    tissue: TissueConfig = dataclasses.field(default_factory=TissueConfig)

    def __post_init__(self) -> None:
        if self.weighting not in ("area", "uniform"):
            raise ValueError(f"weighting must be area or uniform, not {self.weighting!r}")
        if not self.mpps or min(self.mpps) <= 0:
            raise ValueError(f"mpps must be positive µm/px values, got {self.mpps}")
        if isinstance(self.tissue, dict):  # a library caller's mapping: checked like YAML
            object.__setattr__(self, "tissue", from_dict(TissueConfig, self.tissue, "tissue"))

    def tissue_config(self) -> TissueConfig:
        return self.tissue


@dataclasses.dataclass(frozen=True)
class SlideTissue:
    """One usable slide: its tissue mask (h, w) bool, ``scale`` level-0 px per mask px, and the
    mask pixels inside tissue (n, 2) int (row, col) that positions are drawn from."""

    slide_id: str
    path: str
    mpp_override: float | None
    level0_mpp: float
    width: int
    height: int
    mask: np.ndarray
    scale: float
    tissue_rc: np.ndarray

    @property
    def tissue_area_um2(self) -> float:
        return float(len(self.tissue_rc)) * (self.scale * self.level0_mpp) ** 2


@dataclasses.dataclass(frozen=True)
class PatchDraw:
    """Where one patch comes from: level-0 top-left (x, y), side in level-0 px, µm/px."""

    slide: int
    x: int
    y: int
    extent_level0: float
    mpp: float
    tissue_fraction: float


def prepare_slides(
    jobs: Sequence[Any], cfg: OnlinePatchConfig
) -> tuple[list[SlideTissue], list[tuple[str, str]]]:
    """Tissue masks of ``jobs`` (objects with ``slide_id``, ``path``, ``mpp``) → (usable slides,
    [(slide_id, reason)] of skipped ones). Raises ValueError when no slide is usable."""
    usable, skipped = [], []
    tcfg = cfg.tissue_config()
    for job in jobs:
        try:
            with SlideReader(job.path, mpp_override=getattr(job, "mpp", None)) as reader:
                level0_mpp = reader.mpp
                if level0_mpp > min(cfg.mpps) * cfg.max_upsample:
                    raise ValueError(
                        f"level-0 {level0_mpp:.4g} µm/px is coarser than the finest target "
                        f"{min(cfg.mpps)} µm/px"
                    )
                _, mask, scale = slide_tissue_mask(reader, tcfg)
                w, h = reader.info.width, reader.info.height
        except (SlideReadError, ValueError, OSError) as e:
            skipped.append((job.slide_id, f"{type(e).__name__}: {e}"))
            continue
        rc = np.argwhere(mask)
        if len(rc) == 0:
            skipped.append((job.slide_id, "no tissue detected"))
            continue
        usable.append(
            SlideTissue(
                job.slide_id,
                str(job.path),
                getattr(job, "mpp", None),
                level0_mpp,
                w,
                h,
                mask,
                float(scale),
                rc.astype(np.int32),
            )
        )
    for sid, why in skipped:
        log.warning("online patching skips slide %s: %s", sid, why)
    if not usable:
        detail = "; ".join(f"{s}: {r}" for s, r in skipped[:5])
        raise ValueError(f"no usable slide for online patching ({len(skipped)} skipped: {detail})")
    return usable, skipped


class OnlinePatchDataset(Dataset):
    """Item i of the current epoch → ``transform(patch, rng)`` (or the uint8 (p, p, 3) patch).

    ``transform`` gets the item's own ``np.random.Generator`` so augmentations are as
    deterministic as the draw. ``stream`` separates independent uses (training, held-out set).
    """

    def __init__(
        self,
        slides: Sequence[SlideTissue],
        cfg: OnlinePatchConfig,
        seed: int = 0,
        transform: Callable[[np.ndarray, np.random.Generator], Any] | None = None,
        stream: int = 0,
        length: int | None = None,
    ):
        self.slides, self.cfg, self.seed, self.stream = list(slides), cfg, int(seed), int(stream)
        self.transform = transform
        self.length = int(length if length is not None else cfg.samples_per_epoch)
        area = np.array([s.tissue_area_um2 for s in self.slides], dtype=np.float64)
        w = area if cfg.weighting == "area" else np.ones(len(self.slides))
        self.slide_p = w / w.sum()
        self.epoch = 0
        self._readers: dict[int, SlideReader] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, self.epoch, int(index)])

    def draw(self, rng: np.random.Generator) -> PatchDraw:
        """A tissue position: slide by weight, a tissue mask pixel uniformly, a uniform point
        inside it as the patch centre; redrawn until the patch has ``min_tissue`` coverage."""
        cfg = self.cfg
        best: PatchDraw | None = None
        for _ in range(max(1, cfg.max_tries)):
            si = int(rng.choice(len(self.slides), p=self.slide_p))
            s = self.slides[si]
            mpp = float(cfg.mpps[int(rng.integers(len(cfg.mpps)))])
            ext = cfg.patch_size * mpp / s.level0_mpp
            r, c = s.tissue_rc[int(rng.integers(len(s.tissue_rc)))]
            cx, cy = (c + rng.random()) * s.scale, (r + rng.random()) * s.scale
            x = int(np.clip(round(cx - ext / 2), 0, max(0, s.width - int(np.ceil(ext)))))
            y = int(np.clip(round(cy - ext / 2), 0, max(0, s.height - int(np.ceil(ext)))))
            box = np.array([[x, y, x + ext, y + ext]]) / s.scale
            frac = float(area_fraction(s.mask, box)[0])
            d = PatchDraw(si, x, y, float(ext), mpp, frac)
            if frac >= cfg.min_tissue:
                return d
            if best is None or frac > best.tissue_fraction:
                best = d
        assert best is not None
        return best

    def _reader(self, si: int) -> SlideReader:
        if os.getpid() != self._pid:  # a forked worker: never share the parent's handles
            self._readers, self._pid = {}, os.getpid()
        if si not in self._readers:
            s = self.slides[si]
            self._readers[si] = SlideReader(s.path, mpp_override=s.mpp_override)
        return self._readers[si]

    def read(self, d: PatchDraw) -> np.ndarray:
        """The (patch_size, patch_size, 3) uint8 pixels of a draw at exactly ``d.mpp`` µm/px."""
        reader = self._reader(d.slide)
        level = reader.best_level_for_mpp(d.mpp)
        return read_patch(reader, d.x, d.y, d.extent_level0, level, self.cfg.patch_size)

    def __getitem__(self, index: int) -> Any:
        rng = self.rng(index)
        patch = self.read(self.draw(rng))
        return self.transform(patch, rng) if self.transform is not None else patch

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers = {}

    def __getstate__(self) -> dict[str, Any]:  # open slide handles never travel to workers
        st = dict(self.__dict__)
        st["_readers"] = {}
        return st
