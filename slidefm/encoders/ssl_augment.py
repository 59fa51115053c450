"""Multi-crop pathology augmentations for self-supervised tile training (DINO / DINOv2).

One uint8 patch → ``n_global`` global and ``n_local`` local views, each a random resized crop
with 90° rotations, flips, colour jitter, HED (haematoxylin–eosin–DAB) stain jitter (Tellez et
al. 2018) and Gaussian blur, normalised with the encoder's mean/std. H&E tissue has no
canonical orientation, so the dihedral group is a free augmentation; hue-heavy jitter is
replaced by stain-space jitter so the views stay plausible stains. Every random number comes
from the caller's ``np.random.Generator``: a view depends only on (seed, epoch, item).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from skimage.color import combine_stains, hed2rgb, rgb2hed, rgb_from_hed


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Crop sizes are encoder-input px; scales are fractions of the source patch area."""

    global_size: int = 112
    local_size: int = 48
    n_global: int = 2
    n_local: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    p_flip: float = 0.5
    rotate90: bool = True
    p_color: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    p_hed: float = 0.5
    hed_sigma: float = 0.05  # α ~ U(1 ± σ) scale, β ~ U(±σ) shift per stain channel
    hed_shift: float | None = None  # β's range when it should differ from α's (None: hed_sigma)
    hed_vector_sigma: float = 0.0  # N(0, σ) added to the H and E OD vectors (renormalised)
    p_gray: float = 0.0  # random greyscale (DINO: 0.2): no colour shortcut between views
    p_blur_global: float = 0.5
    p_blur_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)


def hed_jitter(
    rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray, vectors: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] → same with stain concentrations ``hed·α + β`` (per
    channel, skimage's Ruifrok–Johnston H/E/DAB vectors), clipped to [0, 1].

    ``vectors`` (3, 3), rows H/E/DAB OD vectors, recomposes with other stain colours than
    the ones decomposed with: scanners and labs differ in stain hue, not only in amount, and
    concentration jitter alone leaves the hue as a per-slide shortcut."""
    hed = rgb2hed(rgb) * alpha + beta
    out = hed2rgb(hed) if vectors is None else combine_stains(hed, vectors)
    return np.clip(out, 0.0, 1.0)


def jittered_stain_vectors(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """skimage's H&E(&DAB) OD matrix with N(0, σ) added to the H and E rows, each renormalised
    to unit length and kept non-negative (an OD vector absorbs, it never emits)."""
    m = rgb_from_hed.copy()
    m[:2] = np.clip(m[:2] + rng.normal(0.0, sigma, (2, 3)), 1e-3, None)
    m[:2] /= np.linalg.norm(m[:2], axis=1, keepdims=True)
    return m


def _crop_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float]):
    """torchvision RandomResizedCrop's box (top, left, height, width), drawn from ``rng``."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


class MultiCrop:
    """``(patch (H, W, 3) uint8, rng) → {"global": (G, 3, S, S), "local": (L, 3, s, s)}``
    float32, normalised with ``mean``/``std`` (the encoder's)."""

    def __init__(self, cfg: MultiCropConfig, mean: tuple[float, ...], std: tuple[float, ...]):
        self.cfg = cfg
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def view(self, img: torch.Tensor, rng: np.random.Generator, size: int, scale, p_blur: float):
        """(3, H, W) float in [0, 1] → one augmented, normalised (3, size, size) view."""
        cfg = self.cfg
        top, left, ch, cw = _crop_box(rng, img.shape[1], img.shape[2], scale)
        x = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True).clamp_(0, 1)
        if cfg.rotate90:
            x = torch.rot90(x, int(rng.integers(4)), dims=(1, 2))
        if rng.random() < cfg.p_flip:
            x = torch.flip(x, dims=(2,))
        if rng.random() < cfg.p_hed:
            a = rng.uniform(1 - cfg.hed_sigma, 1 + cfg.hed_sigma, 3)
            shift = cfg.hed_sigma if cfg.hed_shift is None else cfg.hed_shift
            b = rng.uniform(-shift, shift, 3)
            vec = None  # no draw when off: the default stream stays as it was
            if cfg.hed_vector_sigma > 0:
                vec = jittered_stain_vectors(rng, cfg.hed_vector_sigma)
            rgb = x.permute(1, 2, 0).numpy().astype(np.float64)
            x = torch.from_numpy(hed_jitter(rgb, a, b, vec))
            x = x.permute(2, 0, 1).float().contiguous()
        if rng.random() < cfg.p_color:
            x = TF.adjust_brightness(x, rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
            x = TF.adjust_contrast(x, rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
            x = TF.adjust_saturation(x, rng.uniform(1 - cfg.saturation, 1 + cfg.saturation))
            if cfg.hue > 0:
                x = TF.adjust_hue(x, rng.uniform(-cfg.hue, cfg.hue))
        if cfg.p_gray and rng.random() < cfg.p_gray:  # no draw when off: same stream
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if rng.random() < p_blur:
            sigma = float(rng.uniform(*cfg.blur_sigma))
            k = max(3, 2 * int(round(2 * sigma)) + 1)
            x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        return (x - self.mean) / self.std

    def __call__(self, patch: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        img = torch.from_numpy(np.array(patch, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        g = [
            self.view(img, rng, cfg.global_size, cfg.global_scale, cfg.p_blur_global)
            for _ in range(cfg.n_global)
        ]
        out = {"global": torch.stack(g)}
        if cfg.n_local:
            loc = [
                self.view(img, rng, cfg.local_size, cfg.local_scale, cfg.p_blur_local)
                for _ in range(cfg.n_local)
            ]
            out["local"] = torch.stack(loc)
        return out
