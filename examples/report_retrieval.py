"""Slide↔report retrieval, from slides to numbers, on CPU in one command.

    python examples/report_retrieval.py --out outputs/vl            # reuses zero_shot.py's run
    python examples/report_retrieval.py --out outputs/vl --backend qdrant
    python examples/report_retrieval.py --out outputs/vl_big --n-slides 560  # 113 test slides

Builds (or resumes) the pipeline of vl_workflow.py, then on the held-out patients (split ==
test) retrieves each slide's report among all test reports (slide→report), each report's
slides (report→slide) and other patients' slides of the same subtype (slide→slide), with
Recall@1/5/10, MRR and mAP@K and patient-bootstrap 95% CIs — for the pretrained slide encoder
and for a randomly initialised one (ablation). Strict scores count only the patient's own
report; "same diagnosis" scores count any report of the slide's subtype. Also answers a
free-text query and finds the synthetic reports closest to the bundled real slide.
Figures: <out>/retrieval/similarity.png (test slides × test reports, sorted by subtype).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import vl_workflow  # noqa: E402

from slidefm.wsi.synthetic_reports import BIOMARKER_REMARK_RATES  # noqa: E402

QUERIES = ["small cell carcinoma", "a spindle cell tumour"]


def remark_probs(key: str) -> dict[int, dict[str, float]]:
    """P(remark | label) for one biomarker ("bag" or "spatial"), from the generator's rates:
    {label: {"pos", "neg", "none"}}. Subtype is always stated; everything else in a report
    (organ, size, margins, nodes, stage) is drawn independently of the pixels."""
    r = BIOMARKER_REMARK_RATES[key]
    return {
        1: {"pos": r["pos"], "neg": 0.0, "none": 1.0 - r["pos"]},
        0: {"pos": 0.0, "neg": r["neg"], "none": 1.0 - r["neg"]},
    }


def report_remarks(text: str) -> tuple[str, str]:
    """(bag, spatial) remark of one report: 'pos', 'neg' or 'none' (keyword match; OCR noise
    can hide a remark, which only lowers the ceiling below)."""
    t = " ".join(text.lower().split())
    bag = "neg" if "no signet" in t else "pos" if "signet" in t else "none"
    spatial = "pos" if "invasive front" in t else "neg" if "lymphoid aggregates" in t else "none"
    return bag, spatial


def strict_ceilings(test: pd.DataFrame, k: int = 5) -> dict[str, float]:
    """Expected strict slide→report Recall@k of two oracles that know each test slide's true
    labels, ranking the test reports with random tie-breaking:

    * ``subtype_oracle``: reports of the slide's subtype first (all alike otherwise);
    * ``bayes_oracle``: reports ranked by the likelihood ratio of their text under the slide's
      subtype and biomarker labels (P(remarks | labels) / P(remarks)) — the best any slide
      embedding can do when reports say nothing else the pixels show.
    """
    cases = test.drop_duplicates("case_id").reset_index(drop=True)
    remarks = [report_remarks(r) for r in cases["report"]]

    def score(row: pd.Series, bayes: bool) -> np.ndarray:
        out = (cases["subtype"].to_numpy() == row["subtype"]).astype(float)
        if bayes:
            for j, (b, sp) in enumerate(remarks):
                for key, rem in (("bag", b), ("spatial", sp)):
                    probs = remark_probs(key)
                    label = int(row[f"biomarker_{key}"])
                    out[j] *= probs[label][rem] / (0.5 * (probs[0][rem] + probs[1][rem]))
        return out

    result = {}
    for name, bayes in (("subtype_oracle", False), ("bayes_oracle", True)):
        hits = []
        for _, row in test.iterrows():
            sc = score(row, bayes)
            own = sc[int(np.flatnonzero(cases["case_id"].to_numpy() == row["case_id"])[0])]
            above, ties = int((sc > own).sum()), int((sc == own).sum())  # ties include own
            hits.append(float(np.clip((k - above) / ties, 0.0, 1.0)))
        result[name] = float(np.mean(hits))
    return result


def similarity_png(model, emb: np.ndarray, test: pd.DataFrame, path: Path) -> None:
    """Cosine similarity of test slides (rows) and test reports (columns), sorted by subtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    t = test.sort_values(["subtype", "case_id"]).reset_index()
    cases = t.drop_duplicates("case_id")
    with torch.no_grad():
        zs = model.encode_slide(embeddings=torch.from_numpy(emb[t["index"].to_numpy()])).numpy()
        zt = model.embed_texts(cases["report"].tolist()).numpy()
    from slidefm.io.provenance import add_figure_note

    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(zs @ zt.T, cmap="viridis", aspect="auto")
    for edges, line, ticks in ((t.subtype, ax.axhline, ax.set_yticks),
                               (cases.subtype, ax.axvline, ax.set_xticks)):  # fmt: skip
        lab = edges.to_numpy()
        cuts = np.flatnonzero(lab[1:] != lab[:-1])
        for b in cuts:
            line(b + 0.5, color="w", lw=1.0)
        starts, ends = np.r_[0, cuts + 1], np.r_[cuts + 1, len(lab)]
        ticks((starts + ends - 1) / 2, [f"{lab[s]} ({e - s})" for s, e in zip(starts, ends)])
    ax.tick_params(axis="x", labelrotation=30)
    ax.set(xlabel="test reports, grouped by subtype (count)",
           ylabel="test slides, grouped by subtype (count)",
           title="slide–report cosine similarity, held-out patients\n"
                 "(bright diagonal blocks = same subtype)")  # fmt: skip
    fig.colorbar(im, ax=ax, label="cosine similarity (joint space)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    add_figure_note(fig, "RANDOM WEIGHTS (tile encoder): a pipeline check, not a pretrained model")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = vl_workflow.parser(__doc__)
    ap.add_argument("--backend", default="exact", choices=["exact", "faiss", "qdrant"])
    a = ap.parse_args(argv)
    paths = vl_workflow.prepare(a)
    from slidefm.eval.embed import slide_embeddings
    from slidefm.eval.retrieval_run import format_retrieval, run_retrieve
    from slidefm.models.clip import SlideTextModel

    out = paths["out"] / "retrieval"
    df = pd.read_csv(paths["manifest"])
    test = df[df.split == "test"].reset_index(drop=True)
    summary = {}
    for run, ckpt in vl_workflow.aligned_runs(paths):
        info = run_retrieve(
            ckpt,
            paths["manifest"],
            out / run,
            backend=a.backend,
            queries=QUERIES if run == "pretrained" else None,
            **vl_workflow.test_split(paths, a),
        )
        print(f"\nretrieval ({a.backend}), slide encoder {run}: {info['num_slides']} test "
              f"slides, {info['num_reports']} test reports")  # fmt: skip
        for task, m in info["metrics"].items():
            print(f"  {task:28s} {format_retrieval(m)}")
        summary[run] = info["metrics"]
        for row in info["text_queries"]:
            if row["rank"] <= 3:
                print(f"  query {row['query']!r} #{row['rank']}: {row['slide_id']} "
                      f"({row['diagnosis']}, cos {row['score']:.3f})")  # fmt: skip
    ceil = strict_ceilings(test)
    print(
        "\nstrict slide→report Recall@5 of oracles that know each slide's true labels: "
        f"subtype only {ceil['subtype_oracle']:.3f}, subtype + biomarker remarks (Bayes) "
        f"{ceil['bayes_oracle']:.3f}. Reports state subtype always and biomarkers only sometimes;"
        " organ, size, margins, nodes and stage are not in the pixels, so no slide embedding can"
        " find the patient's own report much more often than the Bayes oracle."
    )
    summary["strict_recall@5_oracles"] = ceil

    model = SlideTextModel.from_checkpoint(paths["pretrained"])
    emb = slide_embeddings(model, test.slide_id.tolist(), features=paths["features"])
    similarity_png(model, emb, test, out / "similarity.png")

    # The bundled real slide against the synthetic test reports (out of distribution: a
    # demonstration that a real SVS goes through the same path, not a meaningful match).
    import torch

    real = slide_embeddings(model, ["CMU-1-Small-Region"], features=paths["real_features"])
    cases = test.drop_duplicates("case_id")
    with torch.no_grad():
        zs = model.encode_slide(embeddings=torch.from_numpy(real)).numpy()
        zt = model.embed_texts(cases.report.tolist()).numpy()
    best = np.argsort(-(zs @ zt.T)[0])[:3]
    print(
        "\nreal slide CMU-1-Small-Region (demo only) → closest synthetic reports' subtypes: "
        + ", ".join(f"{cases.subtype.iloc[i]} ({cases.case_id.iloc[i]})" for i in best)
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfigure: {out}/similarity.png; neighbours: {out}/pretrained/neighbours_*.csv")
    print(vl_workflow.NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
