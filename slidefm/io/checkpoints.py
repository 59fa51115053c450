"""One checkpoint format for every model slidefm writes.

A checkpoint is a ``torch.save`` file of plain data, read back with ``weights_only=True`` (no
pickled code runs on load)::

    {"format": "slidefm.checkpoint", "version": 1,
     "kind": "slide_encoder" | "mil" | "align" | "train_best" | …,
     "config": {…},            # what the kind's builder needs to rebuild the architecture
     "state_dict": {…},        # the weights (standardisation statistics are buffers in it)
     "standardization": {module: provenance},  # what each Standardize was fitted on
     "provenance": {…},        # slidefm version and the writer's metadata
     "sha256": "<hex>"}        # of the state dict (keys, dtypes, shapes, bytes), checked on load

Each kind registers its builder beside its model (``register_kind`` in
``models/slide_encoder.py``, ``models/mil.py``, ``models/clip.py``; published-format converters
stay in ``models/published/``). Files written before this format (``slidefm.slide_encoder``,
``slidefm.mil``, ``slidefm.align``, the trainer's raw ``best.pt``) are converted on read by the
kind's ``legacy`` function, so they keep loading; anything else is one ``CheckpointError`` line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slidefm.io.torch_file import CheckpointError, load_torch_file

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "slidefm.checkpoint"
VERSION = 1


Legacy = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # config, state_dict, provenance


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of checkpoint becomes a model again.

    build(config, payload) → model (weights are loaded afterwards, strictly); ``what``: the
    words used in errors ("MIL checkpoint"); ``hint``: how such a file is made. ``legacy``:
    a file of the format tagged ``legacy_format`` (before this one; "" = untagged) →
    (config, state_dict, provenance), or None when it is not one.
    """

    name: str
    what: str
    build: Callable[[dict[str, Any], dict[str, Any]], nn.Module] | None = None
    hint: str = ""
    legacy_format: str | None = None
    legacy: Callable[[dict[str, Any]], Legacy | None] | None = None


_KINDS: dict[str, Kind] = {}
# Where each kind registers itself (imported on first use, so this module stays light).
_HOMES = {
    "slide_encoder": "slidefm.models.slide_encoder",
    "mil": "slidefm.models.mil",
    "align": "slidefm.models.clip",
    "train_best": "slidefm.io.checkpoints",
}


def register_kind(kind: Kind) -> Kind:
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> Kind:
    if name not in _KINDS and name in _HOMES:
        importlib.import_module(_HOMES[name])
    if name not in _KINDS:
        raise ValueError(f"unknown checkpoint kind {name!r}; known: {', '.join(sorted(_HOMES))}")
    return _KINDS[name]


# ---------------------------------------------------------------------------------- helpers


def state_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and raw bytes of a state dict."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        if not isinstance(t, torch.Tensor):
            h.update(f"{k}|{t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plain(obj: Any) -> Any:
    """``obj`` as types ``torch.load(weights_only=True)`` reads: NumPy scalars/arrays → Python,
    paths → str, dataclasses → dicts; bytes, tensors, tuples and containers kept."""
    import numpy as np
    import torch

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, int) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | bytes | bool | int | float | torch.Tensor):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------ write


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    kind: str,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (or a state dict) as a ``kind`` checkpoint, atomically → path."""
    from torch import nn

    from slidefm import __version__
    from slidefm.io.atomic import atomic_path
    from slidefm.models.standardize import provenance_of

    if isinstance(model, nn.Module):
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        stand = provenance_of(model)
    else:
        state, stand = {k: v.detach().cpu() for k, v in model.items()}, {}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": plain(dict(config or {})),
        "state_dict": state,
        "standardization": plain(stand),
        # no timestamp: the same run writes the same bytes (runs compare checkpoint hashes)
        "provenance": plain({"slidefm_version": __version__, **dict(provenance or {})}),
        "sha256": state_sha256(state),
    }
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


# ------------------------------------------------------------------------------------- read


def read_checkpoint(
    path: str | Path, kind: str, map_location: Any = "cpu", verify: bool = True
) -> dict[str, Any]:
    """The payload of a ``kind`` checkpoint (old formats converted), its sha256 verified.

    Errors, each one line: FileNotFoundError (absent), CheckpointError (unreadable, another
    kind, an unknown or unsupported format, weights that do not match their sha256).
    """
    k = get_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{k.what} {path} not found")
    try:
        raw = load_torch_file(path, k.what, map_location=map_location, weights_only=True)
    except CheckpointError as e:
        if isinstance(e.__cause__, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path}: not a {k.what} slidefm can load safely: it holds pickled Python "
                f"objects (weights_only=True refuses them){_legacy_note(k)}"
            ) from e
        raise
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a slidefm {k.what}{_hint(k)}")
    payload = raw if raw.get("format") == FORMAT else _from_legacy(k, raw)
    if payload is None:
        found = raw.get("format") or "no slidefm format tag"
        raise CheckpointError(f"{path} is not a slidefm {k.what} ({found}){_hint(k)}")
    if payload.get("version", VERSION) > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload['version']} is newer than this "
            f"slidefm reads ({VERSION}); upgrade slidefm"
        )
    if payload.get("kind") != kind:
        raise CheckpointError(
            f"{path} is not a slidefm {k.what}: it holds a {payload.get('kind')!r} "
            f"checkpoint{_hint(k)}"
        )
    want = payload.get("sha256")
    if verify and want is not None and state_sha256(payload["state_dict"]) != want:
        raise CheckpointError(
            f"{path}: the weights do not match the checkpoint's sha256 (modified or corrupt)"
        )
    return payload


def load_checkpoint(
    path: str | Path, kind: str, map_location: Any = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a ``kind`` checkpoint → (model in eval mode, meta without the weights)."""
    from slidefm.models.standardize import restore_provenance

    k = get_kind(kind)
    payload = read_checkpoint(path, kind, map_location)
    if k.build is None:
        raise ValueError(f"{k.what}s hold weights only; load them into a model")
    model = k.build(dict(payload["config"]), payload)
    model.load_state_dict(payload["state_dict"])
    restore_provenance(model, payload.get("standardization") or {})
    return model.eval(), meta_of(payload)


def meta_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "state_dict"}


def _from_legacy(k: Kind, raw: dict[str, Any]) -> dict[str, Any] | None:
    """An old-format file's contents in the current layout (no sha256: none was recorded)."""
    if k.legacy is None or raw.get("format", "") != k.legacy_format:
        return None
    parts = k.legacy(raw)
    if parts is None:
        return None
    config, state_dict, provenance = parts
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": k.name,
        "config": dict(config),
        "state_dict": dict(state_dict),
        "standardization": {},
        "provenance": {"legacy_format": k.legacy_format or "untagged", **dict(provenance)},
        "sha256": None,
    }


def _hint(k: Kind) -> str:
    return f" ({k.hint})" if k.hint else ""


def _legacy_note(k: Kind) -> str:
    if k.name == "mil":
        return (
            "; an old-format MIL checkpoint (slidefm.mil) with NumPy values in its metadata: "
            "re-run `slidefm mil train` with this slidefm to rewrite it"
        )
    return ""


# --------------------------------------------------------------- the trainer's best weights


def _legacy_train_best(raw: dict[str, Any]) -> Legacy | None:
    if "model" not in raw or "step" not in raw:
        return None
    return {}, raw["model"], {k: v for k, v in raw.items() if k != "model"}


register_kind(
    Kind("train_best", "best-weights file", None, "written by the Trainer as checkpoints/best.pt",
         "", _legacy_train_best)
)  # fmt: skip
