"""The reports of a cohort manifest, one per patient (``case_id``): what alignment trains on
and what zero-shot / retrieval score slides against."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def case_reports(df: pd.DataFrame, text_column: str) -> tuple[list[str], list[list[int]]]:
    """(case ids, row indices of each case's slides) and checks every case has a report."""
    if text_column not in df:
        raise ValueError(
            f"manifest has no report column {text_column!r}; set data.text_column "
            f"(columns: {', '.join(df.columns)})"
        )
    cases = list(dict.fromkeys(df["case_id"].astype(str)))
    rows = df.groupby(df["case_id"].astype(str), sort=False).indices
    missing = [c for c in cases if df[text_column].iloc[rows[c]].dropna().astype(str).eq("").all()]
    if missing:
        raise ValueError(f"no report text for case(s) {', '.join(missing[:5])}")
    return cases, [list(rows[c]) for c in cases]


def first_report(df: pd.DataFrame, rows: list[int], text_column: str) -> str:
    vals = [str(v) for v in df[text_column].iloc[rows] if isinstance(v, str) and v.strip()]
    return vals[0] if vals else ""


# Report-text columns tried in order when none is named: ``text`` (generic report CSVs) and
# ``report`` (cohort manifests and ``synth-cohort``'s reports.csv).
TEXT_COLUMNS = ("text", "report")


def read_report_texts(paths: list[str], text_column: str | None = None) -> list[str]:
    """Non-empty report texts of one or more CSV files (column ``text_column``, or the first of
    :data:`TEXT_COLUMNS` present)."""
    import pandas as pd

    texts: list[str] = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"report CSV {p} not found")
        df = pd.read_csv(p)
        wanted = [text_column] if text_column else list(TEXT_COLUMNS)
        col = next((c for c in wanted if c in df), None)
        if col is None:
            raise ValueError(
                f"{p} has no column {' or '.join(map(repr, wanted))} "
                f"(columns: {', '.join(df.columns)}); pass --text-column"
            )
        texts.extend(str(t) for t in df[col].dropna() if str(t).strip())
    if not texts:
        raise ValueError(f"no report text in {', '.join(paths)}")
    return texts
