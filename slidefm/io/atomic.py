"""Atomic file writes: a file under its final name is always complete.

Write to a hidden temporary name in the same directory, flush + fsync, then ``os.replace``
(atomic on POSIX). A crash or SIGKILL leaves at most a ``.*.tmp-*`` file, which
``clean_stale_tmp`` removes on the next run.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on clean exit it is moved onto ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _writer_alive(tmp_name: str) -> bool:
    """True when the process that owns a temporary file (pid in its name) still runs here."""
    try:
        pid = int(tmp_name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(directory: str | Path, max_age_s: float = 6 * 3600) -> list[Path]:
    """Delete temporary files left by interrupted runs in ``directory``; return them.

    A file whose writer still runs on this host (parallel shards) is kept unless it is older
    than ``max_age_s`` (a writer on another host of a shared file system).
    """

    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    now = time.time()
    for p in directory.iterdir():
        if not (p.name.startswith(".") and TMP_MARK in p.name and p.is_file()):
            continue
        with contextlib.suppress(FileNotFoundError):
            if _writer_alive(p.name) and now - p.stat().st_mtime < max_age_s:
                continue
            p.unlink()
            removed.append(p)
    return removed
