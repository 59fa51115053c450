"""Encode a cohort: slides → one ``<slide_id>.h5`` of tile features each (``encode-slides``).

Per-slide atomic outputs make the run resumable and shardable: a slide is skipped when its
complete file has the same config hash (options, seed, device type, effective precision) and
was made from the same source file (size + mtime); a failed slide is reported and the cohort
goes on. A folder belongs to one configuration: re-running with other options is refused
unless ``overwrite`` is given. Each run leaves its own record under ``runs/<run_id>/``
(``errors.csv``, ``summary.json``); the top-level copies describe the latest run. A full or
read-only disk stops the run with one line naming the slide that was not written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import slidefm
from slidefm.encoders.encode_config import EncodeConfig, runtime_key, slide_hash
from slidefm.encoders.slide_features import encode_slide, qc_path, regenerate_qc, source_stat
from slidefm.io.atomic import atomic_path, clean_stale_tmp
from slidefm.runtime import check_interrupted, dist_info, pick_device, seed_everything
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.reader import SlideReadError

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The output folder cannot take the run (not a folder, not writable, full, other config)."""


@dataclasses.dataclass
class SlideResult:
    slide_id: str
    path: str
    status: str  # done | skipped | failed
    tiles: int = 0
    seconds: float = 0.0
    error: str = ""
    note: str = ""  # e.g. a QC image that could not be written (features are complete)


def _source_unchanged(attrs: dict[str, Any], path: str) -> bool:
    try:
        now = source_stat(path)
    except OSError:
        return True  # the slide is gone: keep its complete features, nothing to compare
    return all(attrs.get(k) == v for k, v in now.items())


def _is_disk_error(e: BaseException) -> str | None:
    """'disk full' / 'read-only' when ``e`` is that kind of OSError (h5py hides the errno)."""
    if not isinstance(e, OSError):
        return None
    msg = str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in msg or "errno = 28" in msg:
        return "disk full"
    if e.errno == errno.EROFS or "Read-only file system" in msg:
        return "read-only file system"
    return None


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it takes a file, before any slide is read."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file, not a folder; pass a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / ".write-check") as tmp:
            tmp.write_bytes(b"ok")
        (out_dir / ".write-check").unlink()
    except OSError as e:
        raise OutputError(
            f"--out {out_dir} is not writable ({e.strerror or type(e).__name__}); "
            "choose a folder you can write to"
        ) from None


def plan_slides(
    jobs: list[SlideJob], cfg: EncodeConfig, out_dir: Path, seed: int, overwrite: bool
) -> tuple[list[SlideResult], list[tuple[SlideJob, str]]]:
    """(skipped slides, [(job, config hash)] to encode). A complete file of the same hash and
    source is skipped (its lost QC image redrawn); one of other options is refused unless
    ``overwrite``; one whose slide file changed is re-encoded."""
    from slidefm.io.features import FeatureFileError, is_complete, read_attrs

    runtime = runtime_key(cfg)
    results: list[SlideResult] = []
    todo, other_config = [], []
    for job in jobs:
        chash = slide_hash(cfg, job, seed, runtime)
        h5 = out_dir / f"{job.slide_id}.h5"
        if is_complete(h5, chash) and _source_unchanged(read_attrs(h5), job.path):
            results.append(SlideResult(job.slide_id, job.path, "skipped"))
            if cfg.qc and not qc_path(out_dir, job.slide_id).is_file():
                try:
                    regenerate_qc(job, cfg, out_dir)
                    log.info("%s: QC image was missing; redrawn", job.slide_id)
                except (SlideReadError, FeatureFileError, ValueError, OSError, KeyError) as e:
                    results[-1].note = f"QC image missing and not redrawn: {e}"
            continue
        if is_complete(h5) and read_attrs(h5).get("config_hash") != chash:
            other_config.append(job.slide_id)
        elif is_complete(h5):
            log.info("%s: the slide file changed since it was encoded; re-encoding", job.slide_id)
        todo.append((job, chash))
    if other_config and not overwrite:
        raise OutputError(
            f"--out {out_dir} holds features of {len(other_config)} slide(s) made with other "
            f"options (e.g. {other_config[0]}); use a new --out for this configuration, or pass "
            "--overwrite to re-encode them there"
        )
    return results, todo


def tile_encoder(cfg: EncodeConfig, encoder: Any, needed: bool) -> Any:
    """The given ``encoder``, or (when slides are to be encoded) the config's; warns on
    screen when its weights are random."""
    if needed and encoder is None:
        from slidefm.encoders.tile import TileEncoder

        encoder = TileEncoder.create(
            cfg.encoder,
            weights=cfg.weights,
            device=str(pick_device(cfg.device)),
            precision=cfg.precision,
        )
    if encoder is not None and getattr(encoder, "is_random", False):
        print(
            f"WARNING: tile encoder {cfg.encoder!r} has RANDOM weights (--weights random): "
            "features are for smoke tests only, not pretrained results.",
            file=sys.stderr,
        )
    return encoder


def _failed_slide(job: SlideJob, chash: str, out_dir: Path, e: Exception, dt: float) -> SlideResult:
    """The result of a slide whose encoding raised ``e``: done when its features were
    written and only the QC image failed, else failed."""
    from slidefm.io.features import is_complete

    h5 = out_dir / f"{job.slide_id}.h5"
    if is_complete(h5, chash):
        return SlideResult(job.slide_id, job.path, "done", _num_tiles(h5), dt, "", f"QC: {e}")
    return SlideResult(job.slide_id, job.path, "failed", 0, dt, f"{type(e).__name__}: {e}")


def run_encode(
    jobs: list[SlideJob],
    cfg: EncodeConfig,
    out_dir: str | Path,
    seed: int = 0,
    encoder: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[SlideResult]:
    """Encode ``jobs`` into ``out_dir``; never raises for a bad slide (see the results).

    Raises ``OutputError`` (before any slide) when ``out_dir`` is not a writable folder or
    holds features of another configuration without ``overwrite``, and (mid-run) when the
    disk fills or turns read-only: the message names the slide that was not written.
    """
    from tqdm import tqdm

    from slidefm.io.features import FeatureFileError
    from slidefm.wsi.tiling import EmptyTissueError

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    stale = clean_stale_tmp(out_dir) + clean_stale_tmp(out_dir / "qc")
    if stale:
        log.info("removed %d temporary file(s) of an interrupted run", len(stale))
    seed_everything(seed)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    results, todo = plan_slides(jobs, cfg, out_dir, seed, overwrite)
    encoder = tile_encoder(cfg, encoder, bool(todo))
    slide_errors = (SlideReadError, EmptyTissueError, FeatureFileError, ValueError, OSError,
                    RuntimeError)  # fmt: skip
    total_tiles, t_start = 0, time.perf_counter()
    bar = tqdm(todo, desc="slides", unit="slide", disable=not progress)
    for job, chash in bar:
        check_interrupted()  # a Ctrl-C lost in a DataLoader's shutdown stops before the next slide
        t0 = time.perf_counter()
        try:
            n = encode_slide(job, cfg, encoder, out_dir, seed, chash)
        except slide_errors as e:
            results.append(_failed_slide(job, chash, out_dir, e, time.perf_counter() - t0))
            disk = _is_disk_error(e) or _is_disk_error(e.__cause__)
            if disk:
                _abort_on_disk_error(out_dir, results, cfg, seed, run_id, job, disk)
            log.warning("%s %s: %s", job.slide_id, results[-1].status, e)
            continue
        total_tiles += n
        results.append(SlideResult(job.slide_id, job.path, "done", n, time.perf_counter() - t0))
        bar.set_postfix(
            tiles=total_tiles, tiles_per_s=f"{total_tiles / (time.perf_counter() - t_start):.1f}"
        )
    try:
        _write_reports(out_dir, results, cfg, seed, run_id)
    except OSError as e:
        kind = _is_disk_error(e) or "write error"
        raise OutputError(
            f"{kind} while writing the run report to {out_dir}: every slide listed as done "
            f"is complete; free space and re-run to get errors.csv/summary.json ({e})"
        ) from None
    return results


def _num_tiles(h5: Path) -> int:
    import h5py

    with h5py.File(h5, "r") as f:
        return int(f["coords"].shape[0])


def _abort_on_disk_error(
    out_dir: Path,
    results: list[SlideResult],
    cfg: EncodeConfig,
    seed: int,
    run_id: str,
    job: SlideJob,
    kind: str,
) -> None:
    """Stop the run: later slides would fail the same way (and HDF5 gets into odd states)."""
    done = sum(r.status == "done" for r in results)
    lost = results[-1].status == "failed"
    try:
        _write_reports(out_dir, results, cfg, seed, run_id)
        report = "errors.csv lists it"
    except OSError:
        report = "no report could be written"
    what = (
        f"slide {job.slide_id} was NOT written (no partial file under its name)"
        if lost
        else f"slide {job.slide_id}'s features are complete but its QC image is not"
    )
    raise OutputError(
        f"{kind} in {out_dir}: {what}; {done} slide(s) of this run are complete ({report}). "
        "Free space and re-run the same command: complete slides are skipped."
    )


def _write_reports(
    out_dir: Path, results: list[SlideResult], cfg: EncodeConfig, seed: int, run_id: str = ""
) -> None:
    """errors.csv + summary.json of this run under runs/<run_id>/ (kept), then as the
    top-level 'latest run' copies."""
    import pandas as pd

    rank, world = dist_info()
    suffix = f".rank{rank}" if world > 1 else ""
    failed = [r for r in results if r.status == "failed"]
    summary = {
        "run_id": run_id,
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(failed),
        "tiles": sum(r.tiles for r in results),
        "seconds": round(sum(r.seconds for r in results), 3),
        "notes": {r.slide_id: r.note for r in results if r.note},
        "config": dataclasses.asdict(cfg),
        "runtime": runtime_key(cfg),
        "seed": seed,
        "slidefm_version": slidefm.__version__,
        "history": "runs/<run_id>/ keeps every run's errors.csv and summary.json",
    }
    cols = ["slide_id", "path", "status", "tiles", "seconds", "error", "note"]
    errors = pd.DataFrame([dataclasses.asdict(r) for r in failed], columns=cols)
    errors.insert(0, "run_id", run_id)
    folders = [out_dir / "runs" / run_id, out_dir] if run_id else [out_dir]
    for folder in folders:
        with atomic_path(folder / f"errors{suffix}.csv") as tmp:
            errors.to_csv(tmp, index=False)
        with atomic_path(folder / f"summary{suffix}.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))


def print_summary(results: list[SlideResult], file=None) -> None:
    """A small table: counts, tiles, time, then one line per failed slide."""
    file = file or sys.stdout
    done = [r for r in results if r.status == "done"]
    secs = sum(r.seconds for r in done)
    tiles = sum(r.tiles for r in done)
    rows = [
        ("slides done", len(done)),
        ("slides skipped (complete)", sum(r.status == "skipped" for r in results)),
        ("slides failed", sum(r.status == "failed" for r in results)),
        ("tiles encoded", tiles),
        ("time (s)", f"{secs:.1f}"),
        ("tiles/s", f"{tiles / secs:.1f}" if secs else "-"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), file=file)
    for r in results:
        if r.status == "failed":
            print(f"FAILED {r.slide_id}: {r.error}", file=file)
