"""Optional Macenko stain normalisation (Macenko et al., ISBI 2009).

Estimate a tile's H&E stain vectors from the extreme angles of its optical-density
distribution in the plane of the two main OD eigenvectors, then re-express its stain
concentrations with a reference stain matrix and reference maximum concentrations.
"""

from __future__ import annotations

import numpy as np

# Reference H&E stain vectors (OD space, columns = H, E) and 99th-percentile concentrations
# used by Macenko's reference implementation and most ports of it.
REF_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REF_MAX_CONC = np.array([1.9705, 1.0308])


def _od(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1.0) / io)


def estimate_stains(
    rgb: np.ndarray, beta: float = 0.15, alpha: float = 1.0, io: float = 240.0
) -> np.ndarray | None:
    """(3, 2) unit H&E stain matrix of an RGB image, or None if it has too little stained area."""
    od = _od(rgb.reshape(-1, 3), io)
    od = od[(od > beta).all(axis=1)]
    if len(od) < 50:
        return None
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # two largest eigenvalues
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)  # H first
    stains *= np.sign(stains.sum(axis=0, keepdims=True))  # OD vectors are positive
    return stains / np.linalg.norm(stains, axis=0, keepdims=True)


def macenko_normalize(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    """Normalise an RGB uint8 tile (h, w, 3) to the reference H&E appearance.

    Tiles with too little stain (background) are returned unchanged.
    """
    stains = estimate_stains(rgb, io=io)
    if stains is None:
        return rgb
    od = _od(rgb.reshape(-1, 3), io)
    conc, *_ = np.linalg.lstsq(stains, od.T, rcond=None)  # (2, P)
    max_conc = np.percentile(conc, 99, axis=1)
    conc *= (REF_MAX_CONC / np.maximum(max_conc, 1e-6))[:, None]
    out = io * np.exp(-(REF_STAINS @ conc))
    return np.clip(out.T.reshape(rgb.shape), 0, 255).astype(np.uint8)
