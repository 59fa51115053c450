"""The output folder of a resumable training run (``slidefm pretrain`` / ``slidefm align``).

Both commands keep ``run_config.json`` (resolved config + hash) beside ``checkpoints/`` so a
re-run of the same command resumes. The rule (``claim_run_dir``, also used by ``mil train``):
a run folder belongs to one *identity* = (config hash, input-set hash, seed), recorded in
``run_config.json`` before anything else is written. A re-run with the same identity resumes or
reuses; any other (other features, manifest, seed or config; a folder with outputs but no
identity) is refused, never silently resumed or reused, unless ``--overwrite`` discards the
old run's outputs first. So run_config.json and the checkpoints always describe the data and
seed the weights saw. The pieces the commands share live here, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import h5py
from torch import nn
from torch.utils.data import DataLoader

from slidefm.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_yaml,
    resolve_config_path,
    set_values,
)
from slidefm.io.atomic import atomic_path
from slidefm.io.features import CHECKSUM_ATTR
from slidefm.io.provenance import figure_note
from slidefm.train.loop import TrainConfig, Trainer

T = TypeVar("T")

RUN_CONFIG = "run_config.json"
# Keys of the run info that every final model checkpoint records as provenance.
PROVENANCE_KEYS = ("config_hash", "seed", "config_name", "steps")
# ... and, when the run selected its weights by a validation metric, which step they are from.
OPTIONAL_PROVENANCE_KEYS = ("selected",)


# What pretrain / align write into their folder (discarded by --overwrite).
TRAIN_OUTPUTS = ("checkpoints", RUN_CONFIG, "metrics.csv", "loss_curve.png")
SMALL_FILE = 64 << 20  # hash whole files up to this size; larger ones by size + mtime


class RunDirError(ValueError):
    """An output folder that holds another run."""


def file_fingerprint(path: str | Path) -> str:
    """What identifies one input file's content, cheaply: an HDF5 file with checksummed
    datasets by those checksums (a copied folder keeps its identity), a small file by its
    sha256, anything else by size and modification time."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            sums = [
                f[k].attrs.get(CHECKSUM_ATTR) for k in sorted(f) if isinstance(f[k], h5py.Dataset)
            ]
        if sums and all(x is not None for x in sums):
            return f"{p.name}:crc32:{','.join(str(int(x)) for x in sums)}"
    except OSError:
        pass
    st = p.stat()
    if st.st_size <= SMALL_FILE:
        return f"{p.name}:sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}"
    return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"


def inputs_hash(files: Iterable[str | Path], extra: Any = None) -> str:
    """Stable short hash of an input set (file fingerprints, in the given order, + ``extra``,
    e.g. the manifest columns a run uses)."""
    h = hashlib.sha256()
    for f in files:
        h.update(file_fingerprint(f).encode() + b"\n")
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def run_identity(config_hash: str, inputs: str, seed: int | None) -> dict[str, Any]:
    """The identity a run folder is claimed for (see the module docstring)."""
    return {"config_hash": config_hash, "inputs_hash": inputs, "seed": seed}


def claim_run_dir(
    out: Path, identity: dict[str, Any], overwrite: bool = False, outputs: Sequence[str] = ()
) -> None:
    """Make ``out`` the folder of the run ``identity``: no-op for an empty folder or the same
    identity; refuse one that holds another run (or outputs without a recorded identity);
    with ``overwrite``, delete the old run's ``outputs`` (names or globs under ``out``) first.
    The caller then records ``identity`` in run_config.json before writing anything else."""
    found = sorted({p for pat in (RUN_CONFIG, *outputs) for p in out.glob(pat)})
    if not found:
        return
    prev, old = out / RUN_CONFIG, None
    if prev.is_file():
        try:
            old = json.loads(prev.read_text()).get("identity")
        except (ValueError, AttributeError):
            old = None
    if old == identity:
        return
    if overwrite:
        for p in found:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    if old is None:
        why = f"outputs of an unidentified run ({prev.name} missing, unreadable or older)"
    else:
        names = {"config_hash": "config", "inputs_hash": "input set", "seed": "seed"}
        diff = [names.get(k, k) for k in identity if old.get(k) != identity[k]]
        why = f"a run of another {' / '.join(diff)}"
        if "config" in diff:
            why += (
                f" (another config: hash {old.get('config_hash')}, now {identity['config_hash']})"
            )
    raise RunDirError(
        f"{out} holds {why}; resuming or reusing it would mix two runs. Use a new --out, "
        "or pass --overwrite to discard the old run there"
    )


def check_train_section(train: dict[str, Any]) -> None:
    """Validate a config's ``train`` section; ``out_dir``/``seed`` come from the CLI, so a
    config that sets them would be silently overridden: refuse it instead."""
    bad = {"out_dir", "seed"} & set(train) if isinstance(train, dict) else set()
    if bad:
        raise ConfigError(f"train.{'/'.join(sorted(bad))} come from --out/--seed, not the config")
    from_dict(TrainConfig, train, "train")


def load_run_config(
    cls: type[T],
    path: str | Path | None,
    overrides: list[str] | None,
    subdir: str,
    flags: dict[str, Any] | None = None,
) -> T:
    """A training command's typed config (YAML < ``flags`` < ``--set``, as ``load_config``)
    whose ``train`` section may not set ``out_dir``/``seed`` (they come from --out/--seed)."""
    base = load_yaml(resolve_config_path(path, subdir)) if path else {}
    raw = apply_overrides(set_values(base, flags), overrides)
    check_train_section(raw.get("train") or {})
    return from_dict(cls, raw)


def config_record(cfg: Any) -> dict[str, Any]:
    """A run config as recorded and hashed: every section's fields, without the ``train``
    section's ``out_dir``/``seed`` (they are the run's --out/--seed, recorded on their own)."""
    rec = dataclasses.asdict(cfg)
    for key in ("out_dir", "seed"):
        rec.get("train", {}).pop(key, None)
    return rec


def train_config(train: TrainConfig, out: str | Path, seed: int) -> TrainConfig:
    """The ``train`` section with the run's output folder and seed."""
    return dataclasses.replace(train, out_dir=str(out), seed=seed)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic JSON write (non-JSON values such as paths become strings)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def fit_run(
    model: nn.Module,
    loader: DataLoader,
    tcfg: TrainConfig,
    info: dict[str, Any],
    eval_fn: Callable[[Any], dict[str, float]],
    stop_at_step: int | None = None,
    title: str = "",
) -> bool:
    """Train ``model`` (its forward returns ``(loss, metrics)``), record ``steps``, the
    ``final`` metrics row and, with ``tcfg.select_metric``, the ``selected`` step (whose
    weights ``model`` then holds) in ``info``; True when the run reached ``max_steps`` (not
    stopped early), i.e. when the caller should write its final model."""
    trainer = Trainer(
        model,
        lambda mdl, batch: mdl(batch),
        loader,
        tcfg,
        eval_fn=eval_fn,
        title=title,
        note=figure_note(info),
    )
    rows = trainer.fit(stop_at_step=stop_at_step)
    info["steps"] = trainer.step
    info["final"] = rows[-1] if rows else {}
    if trainer.selection is not None:
        sel = trainer.selection
        info["selected"] = sel
        info["selected_metrics"] = next((r for r in rows if r["step"] == sel["step"]), {})
    return trainer.step >= tcfg.max_steps


def save_final(
    out: Path,
    info: dict[str, Any],
    save: Callable[[Path, dict[str, Any]], Any],
    name: str,
    info_key: str,
    extra: dict[str, Any],
) -> None:
    """Write the finished run's model with ``save(out / name, provenance)`` (e.g. a model's
    ``save_checkpoint``; provenance = the run's ``PROVENANCE_KEYS``, then ``extra``), record its
    path in ``info[info_key]`` and rewrite run_config.json. Call on rank 0 only."""
    path = out / name
    prov = {k: info[k] for k in PROVENANCE_KEYS}
    prov.update({k: info[k] for k in OPTIONAL_PROVENANCE_KEYS if k in info})
    save(path, {**prov, **extra})
    info[info_key] = str(path)
    write_json(out / RUN_CONFIG, info)
