"""Slide↔report and slide→slide retrieval with an alignment checkpoint (``slidefm retrieve``).

Tasks (default all that the inputs allow):

- ``slide2report``: each slide queries the reports (one per patient); relevant = its own
  patient's report.
- ``report2slide``: each report queries the slides; relevant = that patient's slides.
- ``slide2slide`` (needs ``label_column``): each slide queries the other patients' slides
  (itself and its own patient's slides are excluded); relevant = slides with the same label.

With ``label_column``, slide2report and report2slide are also scored with a looser relevance,
``<task>_same_diagnosis``: any report (slide) of the same diagnosis counts. The strict scores
are bounded by what the slide can show: facts in a report that are not in the pixels (organ,
size, margins, nodes) make same-diagnosis reports indistinguishable from the slide.

Outputs in ``out``: ``metrics.json`` (Recall@1/5/10, MRR, mAP@K with patient-bootstrap 95%
CIs, per task), ``neighbours_<task>.csv`` (top-k per query), and with ``queries`` the slides
closest to each free-text query (``text_queries.csv``). With ``backend="qdrant"`` the
collections (with payload slide_id, case_id, diagnosis) stay on disk in ``qdrant_path``
(default ``<out>/qdrant``) or on the server at ``qdrant_url``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidefm.eval.checkpoint_inputs import (
    drop_training_patients,
    input_provenance,
    load_model,
    manifest_rows,
)
from slidefm.eval.embed import slide_embeddings
from slidefm.eval.retrieval import TASKS, build_index, retrieval_metrics, search_excluding
from slidefm.io.atomic import atomic_path
from slidefm.io.reports import case_reports, first_report

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MAX_DEPTH = 1000  # MRR counts the first relevant item within this many results


def _neighbours_frame(qids, ranked, scores, relevant) -> pd.DataFrame:
    import pandas as pd

    rows = [
        {
            "query": q,
            "rank": r + 1,
            "neighbour": n,
            "score": float(scores[i][r]),
            "relevant": n in relevant[i],
        }
        for i, q in enumerate(qids)
        for r, n in enumerate(ranked[i])
    ]
    return pd.DataFrame(rows, columns=["query", "rank", "neighbour", "score", "relevant"])


@dataclasses.dataclass
class RetrievalSet:
    """The scored slides and reports: ids, patients, diagnoses, joint-space embeddings
    (``zs`` [N_slides, E], ``zt`` [N_cases, E]) and the indexes searched."""

    slide_ids: list[str]
    slide_case: list[str]
    diag: list[str]
    cases: list[str]
    case_rows: list[list[int]]
    zs: np.ndarray
    zt: np.ndarray
    slide_index: Any = None
    report_index: Any = None

    @property
    def by_case(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for s, c in zip(self.slide_ids, self.slide_case):
            out.setdefault(c, set()).add(s)
        return out


def check_tasks(tasks: list[str] | None, label_column: str | None) -> list[str]:
    """The tasks to run (default: all the inputs allow); unknown ones are an error."""
    tasks = list(tasks or [t for t in TASKS if t != "slide2slide" or label_column])
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    if "slide2slide" in tasks and not label_column:
        raise ValueError("slide2slide needs --label-column (relevant = same diagnosis)")
    return tasks


def embed_set(
    model: Any,
    df: pd.DataFrame,
    inputs: dict[str, Any],
    text_column: str,
    label_column: str | None,
    with_reports: bool,
) -> RetrievalSet:
    """Slides (and, ``with_reports``, one report per patient) of ``df`` in the joint space."""
    import torch

    slide_ids = df["slide_id"].astype(str).tolist()
    diag = df[label_column].astype(str).tolist() if label_column else [""] * len(df)
    dev = model.logit_scale.device
    with torch.no_grad():
        emb = slide_embeddings(
            model, slide_ids, inputs["features"], inputs["embeddings"], inputs["max_tiles"],
            inputs["seed"], True,
        )  # fmt: skip
        zs = model.encode_slide(embeddings=torch.from_numpy(emb).to(dev)).cpu().numpy()
    cases, case_rows = case_reports(df, text_column) if with_reports else ([], [])
    reports = [first_report(df, r, text_column) for r in case_rows]
    zt = model.embed_texts(reports).cpu().numpy() if reports else np.zeros((0, zs.shape[1]))
    return RetrievalSet(slide_ids, df["case_id"].astype(str).tolist(), diag, cases, case_rows,
                        zs, zt)  # fmt: skip


def build_indexes(rs: RetrievalSet, backend: str, **kw: Any) -> None:
    """The slide index (payload slide_id, case_id, diagnosis) and, with reports, the report
    index (payload case_id, diagnosis) of ``rs``, on ``backend``."""
    payload = [
        {"slide_id": s, "case_id": c, "diagnosis": d}
        for s, c, d in zip(rs.slide_ids, rs.slide_case, rs.diag)
    ]
    rs.slide_index = build_index(backend, rs.zs, rs.slide_ids, payload, collection="slides", **kw)
    if rs.cases:
        case_diag = [rs.diag[r[0]] for r in rs.case_rows]
        payload = [{"case_id": c, "diagnosis": d} for c, d in zip(rs.cases, case_diag)]
        rs.report_index = build_index(backend, rs.zt, rs.cases, payload, collection="reports", **kw)


def search_task(rs: RetrievalSet, task: str, label_column: str | None) -> dict[str, Any] | str:
    """{qids, groups, relevant, ranked, scores, n_cand} of one task, or why it is skipped."""
    n_items = len(rs.cases) if task == "slide2report" else len(rs.slide_ids)
    depth = max(min(MAX_DEPTH, n_items), 1)
    by_case = rs.by_case
    if task == "slide2report":
        ranked, scores = rs.report_index.search(rs.zs, depth)
        return {"qids": rs.slide_ids, "groups": rs.slide_case, "ranked": ranked,
                "scores": scores, "relevant": [{c} for c in rs.slide_case],
                "n_cand": [len(rs.cases)] * len(rs.slide_ids)}  # fmt: skip
    if task == "report2slide":
        ranked, scores = rs.slide_index.search(rs.zt, depth)
        return {"qids": rs.cases, "groups": rs.cases, "ranked": ranked, "scores": scores,
                "relevant": [by_case[c] for c in rs.cases],
                "n_cand": [len(rs.slide_ids)] * len(rs.cases)}  # fmt: skip
    same: dict[str, set[str]] = {}
    for s, d in zip(rs.slide_ids, rs.diag):
        same.setdefault(d, set()).add(s)
    keep = [
        i for i, (c, d) in enumerate(zip(rs.slide_case, rs.diag)) if same[d] - by_case[c]
    ]  # queries with at least one same-label slide of another patient
    if not keep:
        return (
            f"no slide has a same-{label_column} slide of another patient among the "
            f"{len(rs.slide_ids)} scored slides: nothing to retrieve"
        )
    exclude = [by_case[rs.slide_case[i]] for i in keep]
    ranked, scores = search_excluding(rs.slide_index, rs.zs[keep], depth, exclude)
    return {"qids": [rs.slide_ids[i] for i in keep], "groups": [rs.slide_case[i] for i in keep],
            "relevant": [same[rs.diag[i]] - by_case[rs.slide_case[i]] for i in keep],
            "ranked": ranked, "scores": scores,
            "n_cand": [len(rs.slide_ids) - len(e) for e in exclude]}  # fmt: skip


def same_diagnosis_relevance(rs: RetrievalSet, task: str) -> list[set[str]]:
    """Looser relevance of slide2report / report2slide: any item of the same diagnosis."""
    if task == "slide2report":
        lab = {c: rs.diag[r[0]] for c, r in zip(rs.cases, rs.case_rows)}
        return [{c for c in rs.cases if lab[c] == d} for d in rs.diag]
    return [{s for s, d in zip(rs.slide_ids, rs.diag) if d == rs.diag[r[0]]} for r in rs.case_rows]


def text_queries(model: Any, rs: RetrievalSet, queries: list[str], k: int) -> list[dict]:
    """The ``k`` slides closest to each free-text query, one row per (query, rank)."""
    zq = model.embed_texts(list(queries)).cpu().numpy()
    ranked, scores = rs.slide_index.search(zq, k)
    pos = {s: i for i, s in enumerate(rs.slide_ids)}
    return [
        {"query": q, "rank": r + 1, "slide_id": s, "case_id": rs.slide_case[pos[s]],
         "diagnosis": rs.diag[pos[s]], "score": float(scores[i][r])}
        for i, q in enumerate(queries)
        for r, s in enumerate(ranked[i])
    ]  # fmt: skip


def score_tasks(
    rs: RetrievalSet,
    tasks: list[str],
    label_column: str | None,
    boot: dict[str, int],
    k: int,
    out: Path,
) -> dict[str, Any]:
    """{task: metrics} (+ ``<task>_same_diagnosis`` with a label column) with patient-bootstrap
    CIs (``boot``: n_boot, seed); writes each task's top-``k`` ``neighbours_<task>.csv``."""
    results: dict[str, Any] = {}
    for task in tasks:
        found = search_task(rs, task, label_column)
        if isinstance(found, str):
            log.warning("%s skipped: %s", task, found)
            results[task] = {"num_queries": {"value": 0.0, "lo": float("nan"),
                                             "hi": float("nan"), "skipped": found}}  # fmt: skip
            continue
        score_kw = {"ks": (1, 5, 10), "groups": found["groups"], **boot,
                    "n_candidates": found["n_cand"]}  # fmt: skip
        results[task] = retrieval_metrics(found["ranked"], found["relevant"], **score_kw)
        if label_column and task != "slide2slide":
            rel = same_diagnosis_relevance(rs, task)
            results[f"{task}_same_diagnosis"] = retrieval_metrics(found["ranked"], rel, **score_kw)
        top = [r[:k] for r in found["ranked"]]
        frame = _neighbours_frame(found["qids"], top, found["scores"], found["relevant"])
        with atomic_path(out / f"neighbours_{task}.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    return results


def run_retrieve(
    checkpoint: str | Path,
    manifest: str | Path,
    out: str | Path,
    features: str | None = None,
    embeddings: str | None = None,
    text_column: str = "report",
    label_column: str | None = None,
    split: str | None = None,
    tasks: list[str] | None = None,
    backend: str = "exact",
    qdrant_path: str | None = None,
    qdrant_url: str | None = None,
    k: int = 10,
    queries: list[str] | None = None,
    max_tiles: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    include_seen: bool = False,
) -> dict[str, Any]:
    """Run the retrieval tasks and write the outputs; returns {task: metrics} + provenance.

    Patients the checkpoint was trained on are left out unless ``include_seen`` (their
    reports were memorised: retrieving them measures recall of the training set)."""
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, prov = load_model(checkpoint, device, seed)
    prov = input_provenance(prov, features, embeddings)
    if not split:
        log.warning(
            "no --split: scoring every manifest row the checkpoint was not trained on; pass "
            "--split test to score exactly the held-out test patients"
        )
    df, seen = drop_training_patients(manifest_rows(manifest, split, label_column), model,
                                      include_seen)  # fmt: skip
    prov.update(seen)
    tasks = check_tasks(tasks, label_column)
    inputs = {"features": features, "embeddings": embeddings, "max_tiles": max_tiles, "seed": seed}
    with_reports = bool({"slide2report", "report2slide"} & set(tasks))
    rs = embed_set(model, df, inputs, text_column, label_column, with_reports)

    client = None
    if backend == "qdrant" and not qdrant_url:
        from qdrant_client import QdrantClient

        qdrant_path = qdrant_path or str(out / "qdrant")
        Path(qdrant_path).mkdir(parents=True, exist_ok=True)
        client = QdrantClient(path=qdrant_path)
    build_indexes(rs, backend, qdrant_url=qdrant_url, qdrant_client=client)
    results = score_tasks(rs, tasks, label_column, {"n_boot": n_boot, "seed": seed}, k, out)
    if queries:
        rows = text_queries(model, rs, queries, k)
        with atomic_path(out / "text_queries.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
        results["text_queries"] = rows
    if client is not None:
        client.close()
    info = {
        "metrics": {t: m for t, m in results.items() if t != "text_queries"},
        "backend": backend,
        "qdrant": qdrant_url or qdrant_path,
        "num_slides": len(rs.slide_ids),
        "num_reports": len(rs.cases),
        "split": split,
        "seed": seed,
        "mrr_depth": MAX_DEPTH,
        **prov,
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))
    return {**info, "text_queries": results.get("text_queries", [])}


def format_retrieval(metrics: dict[str, dict[str, Any]], names=("recall@1", "recall@5",
                     "recall@10", "mrr")) -> str:  # fmt: skip
    """``recall@1 0.450 [0.300, 0.600] (chance 0.125), …``; says what was omitted/skipped."""
    parts = []
    for n in names:
        if n not in metrics:
            continue
        m = metrics[n]
        chance = f" (chance {m['chance']:.3f})" if "chance" in m else ""
        parts.append(f"{n} {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]{chance}")
    if "omitted" in metrics:
        o = metrics["omitted"]
        parts.append(f"{', '.join(o['metrics'])} omitted ({o['reason']})")
    skipped = metrics.get("num_queries", {}).get("skipped")
    if skipped:
        parts.append(f"skipped: {skipped}")
    n = metrics.get("num_queries", {}).get("value")
    if n and not skipped:
        parts.append(f"{int(n)} queries over ≥ {int(metrics['num_candidates_min']['value'])} "
                     "candidates" if "num_candidates_min" in metrics else f"{int(n)} queries")  # fmt: skip
    return ", ".join(parts)
