"""Zero-shot slide classification from text prompts (CONCH/TITAN-style prompt ensembles).

Prompt file (YAML, ``configs/prompts/*.yaml``)::

    name: synthetic_subtypes
    templates: ["an H&E image of {}.", "histopathology of {}.", ...]   # "{}" = a synonym
    classes:                                   # class name → synonyms (order = class index)
      adenocarcinoma: [adenocarcinoma, gland-forming carcinoma]
      small_cell: [small cell carcinoma, ...]

Every template × synonym of a class is embedded by the text tower and L2-normalised; the class
embedding is their mean, re-normalised. A slide's class logits are
``logit_scale · cos(slide, class)`` and its probabilities their softmax.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from slidefm.config import load_yaml, resolve_config_path
from slidefm.eval.metrics import (
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    confusion_matrix_png,
    f1,
)
from slidefm.io.atomic import atomic_path
from slidefm.io.provenance import figure_note

DEFAULT_TEMPLATES = (
    "an H&E image of {}.",
    "a whole slide image showing {}.",
    "histopathology of {}.",
    "{} tissue.",
    "a microscopy slide of {}.",
    "this is {}.",
)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Classes (in label order), their synonyms, and the templates every synonym fills."""

    classes: tuple[str, ...]
    synonyms: dict[str, tuple[str, ...]]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError("a prompt set needs at least two classes")
        for c in self.classes:
            if not self.synonyms.get(c):
                raise ValueError(f"class {c!r} has no synonyms in the prompt set")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}'")

    def prompts(self, cls: str) -> list[str]:
        """All template × synonym texts of one class (templates outer, synonyms inner)."""
        return [t.format(s) for t in self.templates for s in self.synonyms[cls]]


def load_prompts(path: str | Path) -> PromptSet:
    """A prompt YAML (a path, or a name under ``configs/prompts/``) → ``PromptSet``."""
    p = resolve_config_path(path, "prompts")
    raw = load_yaml(p)
    classes = raw.get("classes")
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError(f"{p}: 'classes' must map each class name to a list of synonyms")
    syn = {}
    for c, v in classes.items():
        v = [v] if isinstance(v, str) else list(v or [])
        syn[str(c)] = tuple(str(s) for s in v)
    return PromptSet(
        classes=tuple(syn),
        synonyms=syn,
        templates=tuple(raw.get("templates") or DEFAULT_TEMPLATES),
        name=str(raw.get("name", p.stem)),
    )


def as_prompt_set(prompts: PromptSet | str | Path | Mapping[str, Sequence[str]]) -> PromptSet:
    """Accept a PromptSet, a YAML path/name, or {class: [synonyms]} (default templates)."""
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str | Path):
        return load_prompts(prompts)
    syn = {str(c): tuple([v] if isinstance(v, str) else v) for c, v in prompts.items()}
    return PromptSet(classes=tuple(syn), synonyms=syn)


def class_embeddings(
    embed_texts: Callable[[list[str]], torch.Tensor], prompts: PromptSet
) -> torch.Tensor:
    """[C, E] unit class embeddings: per class, mean of the unit prompt embeddings, re-normalised.

    embed_texts(texts) -> [T, E] (normalised or not; each prompt is normalised here).
    All prompts go through one call so a batched tower sees them together.
    """
    texts, owner = [], []
    for k, c in enumerate(prompts.classes):
        ps = prompts.prompts(c)
        texts.extend(ps)
        owner.extend([k] * len(ps))
    z = F.normalize(torch.as_tensor(embed_texts(texts)).float(), dim=-1)
    idx = torch.as_tensor(owner, device=z.device)
    sums = torch.zeros(len(prompts.classes), z.shape[1], device=z.device).index_add(0, idx, z)
    return F.normalize(sums, dim=-1)


def zero_shot_probs(
    slide_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """softmax(logit_scale · cos(slide, class)) over classes: [N, E] × [C, E] → [N, C]."""
    zs = F.normalize(torch.as_tensor(slide_emb).float(), dim=-1)
    zc = F.normalize(torch.as_tensor(class_emb).float().to(zs.device), dim=-1)
    return (float(logit_scale) * zs @ zc.T).softmax(dim=-1)


def labels_to_index(labels: Sequence[Any], classes: Sequence[str]) -> np.ndarray:
    """Manifest labels (class names) → indices into ``classes``; unknown labels are an error."""
    pos = {c: i for i, c in enumerate(classes)}
    bad = sorted({str(x) for x in labels if str(x) not in pos})
    if bad:
        raise ValueError(
            f"label(s) {', '.join(bad[:5])} are not classes of the prompt file "
            f"({', '.join(classes)}); add them under 'classes' or fix --label-column"
        )
    return np.array([pos[str(x)] for x in labels], dtype=np.int64)


def zero_shot_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Balanced accuracy, weighted F1 and macro AUROC, each {value, lo, hi} (95% bootstrap,
    whole patients resampled when ``groups`` are given)."""
    c = probs.shape[1]
    fns = {
        "balanced_accuracy": lambda t, p: balanced_accuracy(t, p.argmax(1)),
        "f1_weighted": lambda t, p: f1(t, p.argmax(1), "weighted"),
        "auroc_macro": lambda t, p: auroc(t, p, num_classes=c),
    }
    out = {}
    for i, (name, fn) in enumerate(fns.items()):
        v, lo, hi = bootstrap_ci(fn, y_true, probs, n_boot=n_boot, seed=seed + i, groups=groups)
        out[name] = {"value": v, "lo": lo, "hi": hi}
    out["n"] = {"value": float(len(y_true)), "lo": float("nan"), "hi": float("nan")}
    return out


def write_zero_shot_outputs(
    out_dir: str | Path,
    slide_ids: Sequence[str],
    probs: np.ndarray,
    prompts: PromptSet,
    labels: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
    extra_columns: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """``predictions.csv`` (slide_id, p_<class>…, prediction[, label], ``extra_columns``),
    ``metrics.json`` (provenance, and with labels the metrics) and, with labels,
    ``confusion_matrix.png``. Returns the metrics (or {})."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(prompts.classes)
    df = pd.DataFrame({"slide_id": list(slide_ids)})
    for k, c in enumerate(classes):
        df[f"p_{c}"] = probs[:, k]
    df["prediction"] = [classes[k] for k in probs.argmax(1)]
    for name, col in (extra_columns or {}).items():
        df[name] = list(col)
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {"classes": classes, "prompts": prompts.name, "seed": seed}
    if labels is not None:
        y = labels_to_index(labels, classes)
        df["label"] = [classes[k] for k in y]
        g = None if groups is None else np.asarray(groups)
        metrics = zero_shot_metrics(y, probs, g, n_boot=n_boot, seed=seed)
        confusion_matrix_png(
            y,
            probs.argmax(1),
            out / "confusion_matrix.png",
            class_names=classes,
            title=f"Zero-shot ({prompts.name}), {len(y)} slides",
            note=figure_note(provenance or {}),
        )
    info = {"metrics": metrics, **info, **(provenance or {})}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))
    with atomic_path(out / "predictions.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return metrics


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """One line: ``name value [lo, hi]`` for each metric with a CI."""
    parts = [
        f"{k} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
        for k, v in metrics.items()
        if np.isfinite(v.get("lo", float("nan")))
    ]
    return ", ".join(parts)
