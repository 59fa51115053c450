"""Rebuild the manifests in this folder from the source tables in ``../shared/data/tables``.

Run from the repository root: ``python data_manifests/build.py [--shared ../shared/data]``.
The CSVs are committed, so users never need the source tables; this script documents exactly
how each column was derived, and the tests check the result against the source's own counts.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent

# The 15 genes of Prov-GigaPath's LUAD mutation table; its 5-gene task uses the first five.
GENES_5 = ["EGFR", "FAT1", "KRAS", "LRP1B", "TP53"]
GENES_OTHER = ["PTEN", "ALK", "ROS1", "BRAF", "MET", "PIK3CA", "LKB1", "STK11", "RET"]
CLINICAL = [
    "ajcc_pathologic_stage",
    "ajcc_pathologic_t",
    "ajcc_pathologic_n",
    "percent_tumor_cells",
    "percent_necrosis",
    "vital_status",
    "days_to_death",
]
SPLIT_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))


def patient_split(case_id: str) -> str:
    """Deterministic patient-level split from a hash of the id (no RNG, no source order).

    Same patient → same split on every machine; about 70/15/15 in expectation.
    """
    u = int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for name, frac in SPLIT_FRACTIONS:
        edge += frac
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


def slide_type(slide_id: str) -> str:
    """TCGA slide type from the barcode's last field: DX (diagnostic FFPE), TS/BS (frozen)."""
    return slide_id.rsplit("-", 1)[-1][:2]


def build_luad(shared: Path) -> pd.DataFrame:
    src = pd.read_csv(shared / "tables" / "LUAD-5-gene_TCGA.csv", index_col=0)
    out = pd.DataFrame(
        {
            "slide_id": src["slide_submitter_id"].astype(str),
            "case_id": src["case_submitter_id"].astype(str),
            "gdc_file_id": src["id"],
            "file_name": src["file_name"],
            "slide_type": src["slide_submitter_id"].map(slide_type),
        }
    )
    for g in GENES_5 + GENES_OTHER:
        out[g] = src[g].astype(bool).astype(int)
    for c in CLINICAL:
        out[c] = src[c]
    out["split"] = out["case_id"].map(patient_split)
    return out.sort_values("slide_id").reset_index(drop=True)


def build_cancer_type(shared: Path) -> pd.DataFrame:
    src = pd.read_csv(shared / "tables" / "tcga_patient_to_cancer_type.csv")
    out = pd.DataFrame(
        {
            "case_id": src["patient_id"].astype(str).str.strip(),
            "cancer_type": src["cancer_type"].astype(str).str.strip(),
        }
    )
    out["split"] = out["case_id"].map(patient_split)
    return out.sort_values("case_id").reset_index(drop=True)


BUILDERS = {
    "tcga_luad_mutations.csv": build_luad,
    "tcga_cancer_type_by_patient.csv": build_cancer_type,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = ap.parse_args()
    for name, build in BUILDERS.items():
        df = build(args.shared)
        df.to_csv(HERE / name, index=False, lineterminator="\n")
        print(f"{name}: {len(df)} rows")


if __name__ == "__main__":
    main()
