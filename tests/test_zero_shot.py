"""Prompt ensembling against a naive loop; prompt files; zero-shot outputs and metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from slidefm.eval.zero_shot import (
    PromptSet,
    class_embeddings,
    labels_to_index,
    load_prompts,
    write_zero_shot_outputs,
    zero_shot_probs,
)


def fake_text_encoder(dim=12, seed=0):
    """Deterministic, unnormalised text → vector (sum of per-word random vectors)."""
    rng = np.random.default_rng(seed)
    table: dict[str, np.ndarray] = {}

    def enc(texts):
        rows = []
        for t in texts:
            v = np.zeros(dim)
            for w in t.split():
                if w not in table:
                    table[w] = rng.normal(size=dim)
                v += table[w] * (1 + len(w))
            rows.append(v)
        return torch.tensor(np.array(rows), dtype=torch.float32)

    return enc


PS = PromptSet(
    classes=("adenocarcinoma", "small_cell", "papillary"),
    synonyms={
        "adenocarcinoma": ("adenocarcinoma", "glandular carcinoma"),
        "small_cell": ("small cell carcinoma",),
        "papillary": ("papillary carcinoma", "papillary neoplasm", "papillary tumour"),
    },
    templates=("an H&E image of {}.", "histopathology of {}.", "{} tissue."),
    name="test",
)


def test_class_embeddings_equal_naive_loop():
    enc = fake_text_encoder()
    got = class_embeddings(enc, PS).numpy()
    for k, c in enumerate(PS.classes):
        vecs = []
        for tmpl in PS.templates:
            for syn in PS.synonyms[c]:
                v = enc([tmpl.format(syn)]).numpy()[0].astype(np.float64)
                vecs.append(v / np.sqrt((v**2).sum()))
        m = np.mean(vecs, axis=0)
        np.testing.assert_allclose(got[k], m / np.sqrt((m**2).sum()), atol=1e-5)


def test_zero_shot_probs_are_scaled_cosine_softmax():
    rng = np.random.default_rng(1)
    s, c = rng.normal(size=(5, 12)), rng.normal(size=(3, 12))
    got = zero_shot_probs(torch.tensor(s), torch.tensor(c), 20.0).numpy()
    for i in range(5):
        cos = [s[i] @ c[k] / np.linalg.norm(s[i]) / np.linalg.norm(c[k]) for k in range(3)]
        e = np.exp(20 * (np.array(cos) - max(cos)))
        np.testing.assert_allclose(got[i], e / e.sum(), atol=1e-5)


def test_prompt_files_load_and_templates_differ_from_reports():
    ps = load_prompts("synthetic_subtypes")
    assert ps.classes == ("adenocarcinoma", "small_cell", "spindle_cell", "papillary")
    assert len(ps.templates) >= 4 and all(len(ps.synonyms[c]) >= 2 for c in ps.classes)
    nsclc = load_prompts("tcga_nsclc")
    assert nsclc.classes == ("LUAD", "LUSC")
    try:
        from slidefm.wsi.synthetic import SUBTYPES
    except ImportError:
        return
    assert tuple(SUBTYPES) == ps.classes


def test_prompt_set_validation(tmp_path):
    with pytest.raises(ValueError, match="no synonyms"):
        PromptSet(classes=("a", "b"), synonyms={"a": ("x",), "b": ()})
    with pytest.raises(ValueError, match="exactly one"):
        PromptSet(classes=("a", "b"), synonyms={"a": ("x",), "b": ("y",)}, templates=("no slot",))
    with pytest.raises(ValueError, match="not classes of the prompt file"):
        labels_to_index(["a", "zzz"], ["a", "b"])


def test_outputs_and_metrics_match_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = [PS.classes[k] for k in y]
    m = write_zero_shot_outputs(
        tmp_path, [f"s{i}" for i in range(n)], probs, PS, labels=labels, n_boot=100
    )
    pred = probs.argmax(1)
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_weighted"]["value"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["auroc_macro"]["value"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    for k in ("balanced_accuracy", "f1_weighted", "auroc_macro"):
        assert m[k]["lo"] <= m[k]["value"] <= m[k]["hi"]
    df = pd.read_csv(tmp_path / "predictions.csv")
    assert list(df.columns) == ["slide_id", *[f"p_{c}" for c in PS.classes], "prediction", "label"]
    assert (df["prediction"] == [PS.classes[k] for k in pred]).all()
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["classes"] == list(PS.classes)
