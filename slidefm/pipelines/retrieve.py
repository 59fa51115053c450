"""``slidefm retrieve``: slide↔report and slide→slide retrieval with an alignment checkpoint.

Tasks (``--task``, default all that the inputs allow):

- ``slide2report``: each slide queries the reports (one per patient); relevant = its own
  patient's report.
- ``report2slide``: each report queries the slides; relevant = that patient's slides.
- ``slide2slide`` (needs ``--label-column``): each slide queries the other patients' slides
  (itself and its own patient's slides are excluded); relevant = slides with the same label.

With ``--label-column``, slide2report and report2slide are also scored with a looser relevance,
``<task>_same_diagnosis``: any report (slide) of the same diagnosis counts. The strict scores
are bounded by what the slide can show: facts in a report that are not in the pixels (organ,
size, margins, nodes) make same-diagnosis reports indistinguishable from the slide.

Outputs in ``--out``: ``metrics.json`` (Recall@1/5/10, MRR, mAP@K with patient-bootstrap 95%
CIs, per task), ``neighbours_<task>.csv`` (top-k per query), and with ``--query`` the slides
closest to each free-text query (``text_queries.csv``). With ``--backend qdrant`` the
collections (with payload slide_id, case_id, diagnosis) stay on disk in ``--qdrant-path``
(default ``<out>/qdrant``) or on the server given by ``--qdrant-url``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidefm.eval.retrieval import (
    BACKENDS,
    build_index,
    retrieval_metrics,
    search_excluding,
)
from slidefm.io.atomic import atomic_path
from slidefm.io.provenance import random_weight_notes
from slidefm.pipelines.align import case_reports, first_report, slide_embeddings
from slidefm.pipelines.align_inputs import (
    add_input_args,
    add_run_args,
    drop_training_patients,
    input_provenance,
    load_model,
    manifest_rows,
    run_kwargs,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TASKS = ("slide2report", "report2slide", "slide2slide")


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
    import torch

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
    tasks = list(tasks or [t for t in TASKS if t != "slide2slide" or label_column])
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    if "slide2slide" in tasks and not label_column:
        raise ValueError("slide2slide needs --label-column (relevant = same diagnosis)")

    slide_ids = df["slide_id"].astype(str).tolist()
    slide_case = df["case_id"].astype(str).tolist()
    diag = df[label_column].astype(str).tolist() if label_column else [""] * len(df)
    dev = model.logit_scale.device
    with torch.no_grad():
        emb = slide_embeddings(model, slide_ids, features, embeddings, max_tiles, seed, True)
        zs = model.encode_slide(embeddings=torch.from_numpy(emb).to(dev)).cpu().numpy()
    need_reports = {"slide2report", "report2slide"} & set(tasks)
    cases, case_rows = case_reports(df, text_column) if need_reports else ([], [])
    reports = [first_report(df, r, text_column) for r in case_rows]
    zt = model.embed_texts(reports).cpu().numpy() if reports else np.zeros((0, zs.shape[1]))

    client = None
    if backend == "qdrant" and not qdrant_url:
        from qdrant_client import QdrantClient

        qdrant_path = qdrant_path or str(out / "qdrant")
        Path(qdrant_path).mkdir(parents=True, exist_ok=True)
        client = QdrantClient(path=qdrant_path)
    kw = {"qdrant_url": qdrant_url, "qdrant_client": client}
    slide_payload = [
        {"slide_id": s, "case_id": c, "diagnosis": d}
        for s, c, d in zip(slide_ids, slide_case, diag)
    ]
    slide_index = build_index(backend, zs, slide_ids, slide_payload, collection="slides", **kw)
    report_index = None
    if reports:
        case_diag = [diag[r[0]] for r in case_rows]
        payload = [{"case_id": c, "diagnosis": d} for c, d in zip(cases, case_diag)]
        report_index = build_index(backend, zt, cases, payload, collection="reports", **kw)

    by_case: dict[str, set[str]] = {}
    for s, c in zip(slide_ids, slide_case):
        by_case.setdefault(c, set()).add(s)
    results: dict[str, Any] = {}
    max_depth = 1000  # MRR counts the first relevant item within this many results
    for task in tasks:
        depth = min(max_depth, len(cases) if task == "slide2report" else len(slide_ids))
        depth = max(depth, 1)
        if task == "slide2report":
            qids, groups = slide_ids, slide_case
            relevant = [{c} for c in slide_case]
            ranked, scores = report_index.search(zs, depth)
            n_cand = [len(cases)] * len(qids)
        elif task == "report2slide":
            qids, groups = cases, cases
            relevant = [by_case[c] for c in cases]
            ranked, scores = slide_index.search(zt, depth)
            n_cand = [len(slide_ids)] * len(qids)
        else:
            same = {}
            for s, d in zip(slide_ids, diag):
                same.setdefault(d, set()).add(s)
            keep = [
                i for i, (c, d) in enumerate(zip(slide_case, diag)) if same[d] - by_case[c]
            ]  # queries with at least one same-label slide of another patient
            if not keep:
                why = (
                    f"no slide has a same-{label_column} slide of another patient among the "
                    f"{len(slide_ids)} scored slides: nothing to retrieve"
                )
                log.warning("slide2slide skipped: %s", why)
                results[task] = {"num_queries": {"value": 0.0, "lo": float("nan"),
                                                 "hi": float("nan"), "skipped": why}}  # fmt: skip
                continue
            qids = [slide_ids[i] for i in keep]
            groups = [slide_case[i] for i in keep]
            relevant = [same[diag[i]] - by_case[slide_case[i]] for i in keep]
            exclude = [by_case[slide_case[i]] for i in keep]
            ranked, scores = search_excluding(slide_index, zs[keep], depth, exclude)
            n_cand = [len(slide_ids) - len(e) for e in exclude]
        metrics = retrieval_metrics(
            ranked, relevant, ks=(1, 5, 10), groups=groups, n_boot=n_boot, seed=seed,
            n_candidates=n_cand,
        )  # fmt: skip
        results[task] = metrics
        if label_column and task != "slide2slide":  # looser: any item of the same diagnosis
            if task == "slide2report":
                lab = {c: diag[r[0]] for c, r in zip(cases, case_rows)}
                rel = [{c for c in cases if lab[c] == d} for d in diag]
            else:
                rel = [{s for s, d in zip(slide_ids, diag) if d == diag[r[0]]} for r in case_rows]
            results[f"{task}_same_diagnosis"] = retrieval_metrics(
                ranked, rel, ks=(1, 5, 10), groups=groups, n_boot=n_boot, seed=seed,
                n_candidates=n_cand,
            )  # fmt: skip
        top = [r[:k] for r in ranked]
        frame = _neighbours_frame(qids, top, scores, relevant)
        with atomic_path(out / f"neighbours_{task}.csv") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")

    if queries:
        zq = model.embed_texts(list(queries)).cpu().numpy()
        ranked, scores = slide_index.search(zq, k)
        pos = {s: i for i, s in enumerate(slide_ids)}
        rows = [
            {"query": q, "rank": r + 1, "slide_id": s, "case_id": slide_case[pos[s]],
             "diagnosis": diag[pos[s]], "score": float(scores[i][r])}
            for i, q in enumerate(queries)
            for r, s in enumerate(ranked[i])
        ]  # fmt: skip
        with atomic_path(out / "text_queries.csv") as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
        results["text_queries"] = rows
    if client is not None:
        client.close()
    info = {
        "metrics": {t: m for t, m in results.items() if t != "text_queries"},
        "backend": backend,
        "qdrant": qdrant_url or qdrant_path,
        "num_slides": len(slide_ids),
        "num_reports": len(reports),
        "split": split,
        "seed": seed,
        "mrr_depth": max_depth,
        **prov,
    }
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))
    return {**info, "text_queries": results.get("text_queries", [])}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="slide<->report and slide->slide retrieval")
    add_input_args(p)
    p.add_argument("--manifest", required=True, help="CSV: slide_id, case_id, report (+ labels)")
    p.add_argument("--text-column", default="report", help="report column (default report)")
    p.add_argument("--label-column", help="diagnosis column: enables slide2slide, goes in payload")
    p.add_argument("--split", help="only manifest rows of this split (e.g. test)")
    p.add_argument("--task", nargs="+", choices=TASKS, help="tasks (default: all possible)")
    p.add_argument("--backend", default="exact", choices=BACKENDS)
    p.add_argument("--qdrant-path", help="local Qdrant folder (default <out>/qdrant)")
    p.add_argument("--qdrant-url", help="Qdrant server URL instead of local mode")
    p.add_argument("--k", type=int, default=10, help="neighbours written per query")
    p.add_argument("--query", nargs="+", help="free-text queries: closest slides")
    add_run_args(p)
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    info = run_retrieve(
        args.checkpoint,
        args.manifest,
        args.out,
        text_column=args.text_column,
        label_column=args.label_column,
        split=args.split,
        tasks=args.task,
        backend=args.backend,
        qdrant_path=args.qdrant_path,
        qdrant_url=args.qdrant_url,
        k=args.k,
        queries=args.query,
        **run_kwargs(args),
    )
    held = "" if info.get("num_training_rows_scored") else ", held-out patients only"
    print(f"retrieval ({info['backend']}) over {info['num_slides']} slides{held}:")
    for task, m in info["metrics"].items():
        print(f"  {task}: {format_retrieval(m)}")
    for row in info["text_queries"]:
        if row["rank"] == 1:
            print(f"  query {row['query']!r} → {row['slide_id']} ({row['diagnosis']})")
    if info.get("num_training_rows_scored"):
        print(f"WARNING: {info['num_training_rows_scored']} slides of training patients were "
              "scored (--include-seen): the metrics overestimate performance")  # fmt: skip
    for note in random_weight_notes(info):
        print(f"NOTE: {note}")
    return 0
