"""YAML configs with ``key.sub=value`` CLI overrides, turned into frozen dataclasses.

One mechanism for every pipeline so a run is fully described by (config file, overrides, seed)
and its hash can be recorded in every output file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.resources
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _config_dir() -> Path:
    """The shipped configs: package data ``slidefm/configs`` (in a checkout a symlink to the
    top-level ``configs/``), or the checkout's ``configs/`` where symlinks are not supported."""
    packaged = Path(str(importlib.resources.files("slidefm") / "configs"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config file or override the user must fix."""


def resolve_config_path(name_or_path: str | Path, subdir: str = "") -> Path:
    """Find a config by path, or by name in the shipped configs: ``tiny`` (under
    ``configs/<subdir>/``, ``.yaml`` optional), ``<subdir>/tiny.yaml`` or the repository path
    ``configs/<subdir>/tiny.yaml``, which therefore works from any folder and in an install."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    cands = [CONFIG_DIR / subdir / rel, CONFIG_DIR / subdir / f"{rel}.yaml", CONFIG_DIR / rel]
    for cand in cands:
        if cand.is_file():
            return cand
    avail = sorted(x.stem for x in (CONFIG_DIR / subdir).glob("*.yaml")) if subdir else []
    hint = f" Available in configs/{subdir}: {', '.join(avail)}." if avail else ""
    raise ConfigError(f"Config {str(name_or_path)!r} not found.{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping; a file that does not parse is a ``ConfigError`` naming it and the line."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(cfg: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``cfg`` with ``a.b=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r}: {part!r} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw  # a plain string; from_dict checks its type
    return out


def apply_flags(cfg: dict[str, Any], args: Any, flags: Iterable[str]) -> dict[str, Any]:
    """``cfg`` with the command-line ``flags`` that were given (not None on ``args``) written
    over it: a flag beats the YAML, and ``--set`` overrides (applied after) beat both."""
    for name in flags:
        val = getattr(args, name, None)
        if val is not None:
            cfg[name] = val
    return cfg


def config_hash(cfg: Any) -> str:
    """Stable short hash of a JSON-able config (dataclass or dict): keys sorted, 16 hex chars."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error, not silently dropped."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} options must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"Unknown {cls.__name__} option(s): {', '.join(unknown)}. Known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            val = data[f.name]
            if isinstance(val, list) and f.type in (
                "tuple[int, ...]",
                "tuple[float, ...]",
                "tuple[str, ...]",
            ):
                val = tuple(val)
            _check_type(cls.__name__, f.name, f.type, val)
            kwargs[f.name] = val
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}


def _check_type(owner: str, name: str, annotation: Any, val: Any) -> None:
    """Raise ``ConfigError`` when ``val`` does not fit a simple annotation (``int``, ``float``,
    ``str``, ``bool``, ``dict``, ``X | None``); other annotations are left to the class."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = [a.strip() for a in ann.split("|")]
    if val is None and "None" in parts:
        return
    types = [_SCALARS[a] for a in parts if a in _SCALARS]
    if not types or len(types) != len([a for a in parts if a != "None"]):
        return
    # bool is an int subclass in Python, but ``patch_size: true`` is a typo, not 1.
    ok = any(isinstance(val, t) for t in types) and (bool in types or not isinstance(val, bool))
    if not ok:
        raise ConfigError(
            f"{owner} option {name!r} must be {' or '.join(parts)}, got {val!r} "
            f"({type(val).__name__})"
        )


def load_config(
    cls: type[T], path: str | Path | None, overrides: list[str] | None = None, subdir: str = ""
) -> T:
    """YAML file (optional) + overrides → ``cls`` instance."""
    base = load_yaml(resolve_config_path(path, subdir)) if path else {}
    return from_dict(cls, apply_overrides(base, overrides))
