"""Reading ``.pt`` files: a truncated or corrupt file is one error naming it, never a
traceback from the zip or pickle layer (``torch.load`` raises half a dozen exception types)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a torch file)."""


def load_torch_file(path: str | Path, what: str = "checkpoint", **kwargs: Any) -> Any:
    """``torch.load(path, **kwargs)``; FileNotFoundError when absent, CheckpointError naming
    the file when it does not load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return torch.load(path, **kwargs)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable {what} (truncated or corrupt?): {detail}"
        ) from e
