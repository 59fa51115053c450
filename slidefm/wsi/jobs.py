"""Which slides a command runs on: slide files, folders and/or a manifest → sorted ``SlideJob``s
(one per ``slide_id``), and the shard of them one process takes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slidefm.wsi.reader import SLIDE_EXTENSIONS, slide_id_from_path


@dataclasses.dataclass
class SlideJob:
    slide_id: str
    path: str
    mpp: float | None = None


def collect_slides(inputs: list[str], manifest: str | None = None) -> list[SlideJob]:
    """Slide files, folders (recursive, by extension) and/or a manifest → sorted, unique jobs."""
    import pandas as pd

    from slidefm.io.manifest import check_slide_id, read_manifest

    jobs: list[SlideJob] = []
    if manifest:
        df = read_manifest(manifest, required=("slide_id", "path"))
        for row in df.itertuples(index=False):
            mpp = getattr(row, "mpp", None)
            jobs.append(
                SlideJob(
                    str(row.slide_id),
                    str(row.path),
                    float(mpp) if mpp is not None and pd.notna(mpp) else None,
                )
            )
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # DICOM series span several files of one folder: scan them only when named explicitly.
            found = sorted(
                q
                for q in p.rglob("*")
                if q.is_file()
                and q.suffix.lower() in SLIDE_EXTENSIONS
                and q.suffix.lower() != ".dcm"
            )
            jobs.extend(SlideJob(slide_id_from_path(q), str(q)) for q in found)
        elif p.exists():
            jobs.append(SlideJob(slide_id_from_path(p), str(p)))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not jobs:
        raise ValueError("no slides found: pass slide files, folders or --manifest CSV")
    seen: dict[str, str] = {}
    for j in jobs:
        check_slide_id(j.slide_id, f"slide {j.path}")
        if j.slide_id in seen and seen[j.slide_id] != j.path:
            raise ValueError(
                f"slide_id {j.slide_id!r} names two files: {seen[j.slide_id]} and {j.path}; rename one or use a manifest"
            )
        seen[j.slide_id] = j.path
    uniq = {j.slide_id: j for j in jobs}
    return [uniq[k] for k in sorted(uniq)]


def shard(jobs: list[SlideJob], num_shards: int, shard_index: int) -> list[SlideJob]:
    """Every ``num_shards``-th slide starting at ``shard_index`` (slides are sorted by id)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    return jobs[shard_index::num_shards]


def select_jobs(inputs: list[str], manifest: str | None, split: str | None) -> list[SlideJob]:
    """Slides of the command line / manifest; ``split`` keeps the manifest's rows of that split
    (paths relative to the manifest's folder are resolved)."""
    if manifest and split:
        import pandas as pd

        df = pd.read_csv(manifest)
        if "split" not in df:
            raise ValueError(f"{manifest} has no split column for --split {split}")
        keep = set(df.loc[df["split"].astype(str) == split, "slide_id"].astype(str))
        if not keep:
            raise ValueError(f"{manifest}: no rows with split == {split!r}")
        jobs = [j for j in collect_slides([], manifest) if j.slide_id in keep]
        return jobs + (collect_slides(inputs) if inputs else [])
    return collect_slides(inputs, manifest)
