"""Per-slide scores for the viewer, computed once per slide and cached (never per tile).

- MIL: ``slidefm.eval.heatmap_slide.score_slide`` (the numbers ``slidefm heatmap`` writes):
  per-tile attention or gradient × input, rank-normalised for display, and the slide's class
  probabilities.
- Zero-shot (alignment checkpoint + prompt file): slide-level class probabilities
  ``softmax(logit_scale · cos(slide, class))`` as ``slidefm zero-shot`` computes them, and per
  tile the same with the tile alone as a one-tile bag through the slide encoder (MI-Zero-style
  tile similarity; a map of where each class's text matches).
- Retrieval: the manifest's reports (one per case) embedded once; a slide's top-k reports by
  cosine similarity in the joint space.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidefm.eval.heatmap import normalize_scores
from slidefm.io.features import SlideFeatures, read_features
from slidefm.viewer.cohort import Cohort, SlideEntry


@dataclasses.dataclass
class Layer:
    """One per-tile overlay: raw ``scores`` (N,) and display ``values01`` (N,) in [0, 1]."""

    name: str  # URL-safe id: "mil", "zs0", "zs1", ...
    label: str
    scores: np.ndarray
    values01: np.ndarray
    legend: tuple[str, str]  # text at 0 and at 1
    cmap: str = "jet"


@dataclasses.dataclass
class SlideScores:
    """Everything the side panel and the overlays need for one slide."""

    features: SlideFeatures | None = None
    layers: dict[str, Layer] = dataclasses.field(default_factory=dict)
    mil: dict[str, Any] | None = None
    zero_shot: dict[str, Any] | None = None
    retrieval: list[dict[str, Any]] | None = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def patch_size_level0(self) -> float:
        return float(self.features.attrs["patch_size_level0"]) if self.features else 0.0


class Models:
    """The checkpoints given on the command line, loaded once."""

    def __init__(
        self,
        mil: str | Path | None = None,
        align: str | Path | None = None,
        prompts: str | Path | None = None,
        top_k: int = 5,
        device: str = "cpu",
        seed: int = 0,
    ):
        from slidefm.runtime import pick_device, seed_everything

        seed_everything(seed)
        self.device = pick_device(device)
        self.top_k = int(top_k)
        self.mil_model, self.mil_meta, self.mil_path = None, None, None
        if mil is not None:
            from slidefm.models.mil import load_mil_checkpoint

            self.mil_model, self.mil_meta = load_mil_checkpoint(mil)
            self.mil_model = self.mil_model.to(self.device)
            self.mil_path = str(mil)
        self.align, self.align_prov, self.prompts, self.class_emb = None, None, None, None
        if align is not None:
            from slidefm.eval.checkpoint_inputs import load_model

            self.align, self.align_prov = load_model(align, str(self.device), seed)
            if prompts is not None:
                from slidefm.eval.zero_shot import class_embeddings, load_prompts

                self.prompts = load_prompts(prompts)
                with torch.no_grad():
                    self.class_emb = class_embeddings(self.align.embed_texts, self.prompts)
        self._reports: tuple[list[str], list[str], np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def mil_random(self) -> bool:
        return bool(self.mil_meta) and str(self.mil_meta.get("weights", "")) == "random"

    def reports(self, cohort: Cohort) -> tuple[list[str], list[str], np.ndarray] | None:
        """(case ids, report texts, [R, E] unit embeddings) of the manifest, once."""
        if self.align is None or cohort.manifest is None or "report" not in cohort.manifest:
            return None
        with self._lock:
            if self._reports is None:
                from slidefm.io.reports import case_reports, first_report

                df = cohort.manifest
                cases, rows = case_reports(df, "report")
                texts = [first_report(df, r, "report") for r in rows]
                z = self.align.embed_texts(texts).cpu().numpy()
                self._reports = (cases, texts, z)
            return self._reports


def _mil_layer(models: Models, sf: SlideFeatures) -> tuple[Layer, dict[str, Any]]:
    from slidefm.eval.heatmap_slide import score_slide

    res = score_slide(models.mil_model, models.mil_meta, sf, None, models.device)
    classes, prob, cls = res["classes"], res["probabilities"], res["class"]
    label = "attention" if res["kind"] == "attention" else f"grad × input ({classes[cls]})"
    layer = Layer(
        "mil",
        f"MIL {label}",
        res["scores"],
        normalize_scores(res["scores"], "rank"),
        ("low (rank 0)", "high (rank 1)"),
    )
    info = {
        "checkpoint": models.mil_path,
        "model": models.mil_meta.get("model"),
        "score": res["kind"],
        "classes": classes,
        "probabilities": dict(zip(classes, map(float, prob))),
        "prediction": classes[int(np.argmax(prob))],
        "probability": float(np.max(prob)),
        "explained_class": classes[cls],
        "random_weights": models.mil_random,
    }
    return layer, info


@torch.no_grad()
def _zero_shot(models: Models, sf: SlideFeatures) -> tuple[list[Layer], dict[str, Any], np.ndarray]:
    """(per-class tile layers, slide-level info, joint-space slide embedding [E])."""
    from slidefm.eval.zero_shot import zero_shot_probs

    m, dev = models.align, models.device
    if m.slide_encoder is None:
        raise ValueError("this alignment model works on precomputed slide embeddings only")
    feats = torch.from_numpy(np.ascontiguousarray(sf.features, np.float32)).to(dev)
    grid = torch.from_numpy(sf.grid.astype(np.int64)).to(dev)
    z_slide = m.encode_slide(feats[None], grid[None])  # [1, E]
    layers, info = [], {"random_weights": models.align_prov["slide_encoder_weights"] == "random"}
    info["checkpoint"] = models.align_prov["checkpoint"]
    if models.class_emb is not None:
        classes = list(models.prompts.classes)
        p_slide = zero_shot_probs(z_slide, models.class_emb, m.scale)[0].cpu().numpy()
        tiles = []
        for i in range(0, len(feats), 256):  # each tile alone: a one-tile bag at grid (0, 0)
            f = feats[i : i + 256, None, :]
            tiles.append(m.encode_slide(f, torch.zeros(len(f), 1, 2, dtype=torch.long, device=dev)))
        z_tiles = torch.cat(tiles) if tiles else torch.zeros(0, z_slide.shape[1], device=dev)
        p_tiles = zero_shot_probs(z_tiles, models.class_emb, m.scale).cpu().numpy()
        for k, c in enumerate(classes):
            layers.append(
                Layer(f"zs{k}", f"zero-shot p({c}) per tile", p_tiles[:, k], p_tiles[:, k], ("0", "1"), "viridis")
            )  # fmt: skip
        info.update(
            prompts=models.prompts.name,
            classes=classes,
            probabilities=dict(zip(classes, map(float, p_slide))),
            prediction=classes[int(np.argmax(p_slide))],
        )
    return layers, info, z_slide[0].cpu().numpy()


def compute_scores(entry: SlideEntry, models: Models, cohort: Cohort) -> SlideScores:
    """All scores of one slide; each failure is recorded under its part, never raised."""
    out = SlideScores()
    if entry.features is None:
        return out
    try:
        out.features = read_features(entry.features)
    except Exception as e:  # missing/corrupt file: shown in the panel
        out.errors["features"] = f"{type(e).__name__}: {e}"
        return out
    if models.mil_model is not None:
        try:
            layer, out.mil = _mil_layer(models, out.features)
            out.layers[layer.name] = layer
        except Exception as e:
            out.errors["mil"] = f"{type(e).__name__}: {e}"
    if models.align is not None:
        try:
            layers, out.zero_shot, z = _zero_shot(models, out.features)
            out.layers.update({ly.name: ly for ly in layers})
            rep = models.reports(cohort)
            if rep is not None:
                cases, texts, zr = rep
                sim = zr @ z
                order = np.argsort(-sim, kind="stable")[: models.top_k]
                out.retrieval = [
                    {
                        "rank": r + 1,
                        "case_id": cases[i],
                        "similarity": float(sim[i]),
                        "own_case": cases[i] == entry.case_id,
                        "report": texts[i],
                    }
                    for r, i in enumerate(order)
                ]
        except Exception as e:
            out.errors["align"] = f"{type(e).__name__}: {e}"
    return out


class ScoreCache:
    """slide_id → ``SlideScores``, computed once per slide (one computation per slide even
    under concurrent requests)."""

    def __init__(self, cohort: Cohort, models: Models):
        self.cohort, self.models = cohort, models
        self._done: dict[str, SlideScores] = {}
        self._locks: dict[str, threading.Lock] = {s: threading.Lock() for s in cohort.entries}
        self.computed = 0  # number of computations (tests check it stays one per slide)

    def get(self, slide_id: str) -> SlideScores:
        got = self._done.get(slide_id)
        if got is not None:
            return got
        with self._locks[slide_id]:
            if slide_id not in self._done:
                self._done[slide_id] = compute_scores(
                    self.cohort.entries[slide_id], self.models, self.cohort
                )
                self.computed += 1
            return self._done[slide_id]
