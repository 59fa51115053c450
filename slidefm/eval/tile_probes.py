"""``slidefm probe-tiles`` (CLI: ``pipelines/probe_tiles.py``): eva-style tile-level probes of one or more tile encoders.

Features of labelled tiles (``encode-slides`` files joined with a label table on the tiles'
level-0 top-left (x, y), e.g. the synthetic cohort's ``cells.csv``) → linear probe (C chosen on
validation), cosine kNN (k = 20) and few-shot probes (k shots per class, many draws; probe
``{k}shot``: SimpleShot prototypes, ``{k}shot_linear``: standardised logistic regression).
Tiles are split by patient (``case_id``: a patient's tiles never cross splits), with the SAME
splits per seed for every encoder, so the encoders' balanced accuracies (mean ± sd over
seeds) compare like for like (``eval.protocol.patient_split``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from slidefm.eval.metrics import balanced_accuracy
from slidefm.eval.probes import few_shot, knn_probe, l2_rows, linear_probe
from slidefm.eval.protocol import patient_split
from slidefm.io.atomic import atomic_path
from slidefm.io.features import read_attrs, read_features
from slidefm.io.manifest import read_manifest


def labelled_features(
    features: str | Path, labels: pd.DataFrame, label_column: str
) -> tuple[np.ndarray, pd.DataFrame]:
    """(x (n, D) float32, rows (n) slide_id/x/y/label) for the label rows whose slide has a
    feature file in ``features`` and a tile with that exact top-left; a slide missing from the
    folder is an error (encoders would otherwise be scored on different tiles)."""
    xs, rows = [], []
    for sid, lab in labels.groupby("slide_id", sort=True):
        path = Path(features) / f"{sid}.h5"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature file for labelled slide {sid}")
        sf = read_features(path)
        pos = {(int(x), int(y)): i for i, (x, y) in enumerate(sf.coords)}
        idx = [pos.get((int(x), int(y)), -1) for x, y in zip(lab["x"], lab["y"])]
        keep = np.array(idx) >= 0
        xs.append(sf.features[np.array(idx)[keep]])
        rows.append(lab[keep][["slide_id", "case_id", "x", "y", label_column]])
    return np.concatenate(xs).astype(np.float32), pd.concat(rows, ignore_index=True)


def probe_encoder(
    x: np.ndarray,
    y: np.ndarray,
    cases: np.ndarray,
    seeds: list[int],
    shots: tuple[int, ...],
    knn_k: int = 20,
    n_draws: int = 20,
) -> pd.DataFrame:
    """One row per (seed, probe): balanced accuracy on that seed's test patients."""
    c = int(y.max()) + 1
    rows = []
    for seed in seeds:
        part = patient_split(cases, seed)
        tr, va, te = (part == s for s in ("train", "val", "test"))
        lp = linear_probe(x[tr], y[tr], x[va], y[va], x[te], c, seed=seed)
        rows.append(
            {"seed": seed, "probe": "linear", "bacc": balanced_accuracy(y[te], lp.proba.argmax(1))}
        )
        trva = tr | va
        kp = knn_probe(x[trva], y[trva], x[te], c, k=knn_k)
        rows.append(
            {"seed": seed, "probe": f"knn{knn_k}", "bacc": balanced_accuracy(y[te], kp.argmax(1))}
        )
        for clf, suffix in (("prototype", ""), ("linear", "_linear")):
            fs = few_shot(x[trva], y[trva], x[te], y[te], c, shots=shots, n_draws=n_draws,
                          seed=seed, classifier=clf)  # fmt: skip
            for k, g in fs.groupby("k"):
                bacc = float(g["balanced_accuracy"].mean())
                rows.append({"seed": seed, "probe": f"{k}shot{suffix}", "bacc": bacc})
    return pd.DataFrame(rows)


def same_slide_neighbours(x: np.ndarray, slide_ids: np.ndarray, k: int = 20) -> dict[str, float]:
    """How much of an embedding is slide identity (stain, scanner, batch) rather than tissue:
    the mean fraction of each tile's ``k`` cosine nearest neighbours (itself excluded) that
    come from its own slide, next to that fraction for neighbours drawn at random. An encoder
    that clusters tiles by slide scores high here and loses on cross-patient kNN.

    x (n, D) features; slide_ids (n,). Ties keep the lower index."""
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("same_slide_neighbours needs at least two tiles")
    xn = l2_rows(x)
    sid = np.asarray(slide_ids).astype(str)
    hits = 0.0
    for start in range(0, n, 1024):  # (1024, n) similarity blocks: memory linear in n
        sim = xn[start : start + 1024] @ xn.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf
        nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        hits += float((sid[nn] == sid[start : start + 1024, None]).sum())
    _, counts = np.unique(sid, return_counts=True)
    chance = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    return {f"same_slide_knn{k}": hits / (n * k), "same_slide_chance": chance}


def _encoder_summary(
    folder: str, first_slide: str, n_tiles: int, table: pd.DataFrame, neighbours: dict
) -> dict:
    """One encoder's entry of summary.json: its features, weights and mean ± sd per probe."""
    weights = read_attrs(Path(folder) / f"{first_slide}.h5").get("encoder_weights")
    return {
        "features": str(folder),
        "encoder_weights": weights,
        "n_tiles": int(n_tiles),
        **neighbours,
        **{
            p: {
                "mean": float(g["bacc"].mean()),
                "sd": float(g["bacc"].std(ddof=1)) if len(g) > 1 else 0.0,
            }
            for p, g in table.groupby("probe", sort=False)
        },
    }


def run_probe_tiles(
    features: dict[str, str],
    labels_csv: str,
    manifest: str,
    out: str | Path,
    label_column: str = "cell_type",
    splits: tuple[str, ...] = ("val", "test"),
    seeds: tuple[int, ...] = (0, 1, 2),
    shots: tuple[int, ...] = (1, 5, 10),
    max_per_slide: int | None = None,
) -> pd.DataFrame:
    """Probe every ``name → feature folder`` on the labelled tiles of the manifest's
    ``splits`` slides; writes ``tile_probes.csv`` (per seed) and ``summary.json`` (mean ± sd)."""
    man = read_manifest(manifest)
    if "split" in man and splits:
        man = man[man["split"].astype(str).isin(splits)]
    lab = pd.read_csv(labels_csv, dtype={"slide_id": str})
    lab = lab.merge(man[["slide_id", "case_id"]], on="slide_id")
    if lab.empty:
        raise ValueError(f"{labels_csv}: no labelled tiles on the manifest's {splits} slides")
    if max_per_slide:
        lab = lab.groupby("slide_id", group_keys=False).apply(
            lambda g: g.sample(min(len(g), max_per_slide), random_state=0)
        )
    classes = sorted(lab[label_column].astype(str).unique())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables, summary, ref_rows = [], {}, None
    for name, folder in features.items():
        x, rows = labelled_features(folder, lab, label_column)
        key = rows[["slide_id", "x", "y"]].to_numpy()
        if ref_rows is None:
            ref_rows = key
        elif not np.array_equal(ref_rows, key):
            raise ValueError(f"{name}: not the same labelled tiles as the first encoder")
        y = rows[label_column].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
        df = probe_encoder(x, y, rows["case_id"].astype(str).to_numpy(), list(seeds), shots)
        df.insert(0, "encoder", name)
        tables.append(df)
        nb = same_slide_neighbours(x, rows["slide_id"].to_numpy())
        summary[name] = _encoder_summary(folder, rows["slide_id"].iloc[0], len(y), df, nb)
    table = pd.concat(tables, ignore_index=True)
    with atomic_path(out / "tile_probes.csv") as tmp:
        table.to_csv(tmp, index=False)
    meta = {
        "classes": classes,
        "seeds": list(seeds),
        "splits": list(splits),
        "metric": "balanced_accuracy",
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({**meta, "encoders": summary}, indent=2))
    return table
