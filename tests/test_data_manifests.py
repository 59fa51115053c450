"""The shipped cohort manifests read through the one manifest reader and agree with their
sources' own published counts (MANIFEST.md of ../shared/data), not with the build script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from slidefm.io.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "data_manifests"
SHARED = Path(os.environ.get("SLIDEFM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def test_luad_manifest_counts_match_source_description():
    df = read_manifest(MANIFESTS / "tcga_luad_mutations.csv", required=("slide_id", "case_id"))
    assert len(df) == 1345
    assert df["case_id"].nunique() == 521
    # Positives per gene as stated for the source table (MANIFEST.md).
    expected = {"EGFR": 188, "FAT1": 124, "KRAS": 335, "LRP1B": 423, "TP53": 618}
    assert {g: int(df[g].sum()) for g in expected} == expected
    assert set(df["slide_type"]) <= {"DX", "TS", "BS"}
    # A TCGA slide barcode starts with its patient barcode.
    assert (df["slide_id"].str[:12] == df["case_id"]).all()
    # Splits keep patients together (read_manifest enforces it; check the fractions too).
    frac = df.drop_duplicates("case_id")["split"].value_counts(normalize=True)
    assert set(frac.index) == {"train", "val", "test"}
    assert 0.6 < frac["train"] < 0.8


def test_cancer_type_manifest_counts_match_source_description():
    df = pd.read_csv(MANIFESTS / "tcga_cancer_type_by_patient.csv")
    assert len(df) == 11160 and df["case_id"].is_unique
    assert df["cancer_type"].nunique() == 33
    assert df["case_id"].str.match(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$").all()


def test_manifests_rebuild_identically_from_shared_tables(tmp_path):
    """The committed CSVs are exactly what build.py derives from the source tables."""
    assert SHARED.is_dir(), f"shared data missing at {SHARED}"
    work = tmp_path / "data_manifests"
    work.mkdir()
    (work / "build.py").write_text((MANIFESTS / "build.py").read_text())
    subprocess.run(
        [sys.executable, str(work / "build.py"), "--shared", str(SHARED)],
        check=True,
        capture_output=True,
    )
    for name in ("tcga_luad_mutations.csv", "tcga_cancer_type_by_patient.csv"):
        assert (work / name).read_bytes() == (MANIFESTS / name).read_bytes(), name


@pytest.mark.parametrize("name", ["tcga_luad_mutations.csv"])
def test_manifest_split_never_splits_a_patient(name):
    df = pd.read_csv(MANIFESTS / name)
    assert (df.groupby("case_id")["split"].nunique() == 1).all()
