"""YAML configs with ``key.sub=value`` CLI overrides, turned into frozen (nested) dataclasses.

One mechanism for every pipeline so a run is fully described by (config file, overrides, seed)
and its hash can be recorded in every output file.

Precedence, the same for every command (``load_config``): the YAML file, then the explicit
command-line flags (``--target-mpp``, ``--tissue``, ``--slide-encoder``, …), then the ``--set
key.sub=value`` overrides: ``YAML < flags < --set``. ``--set`` has the last word because it
reaches every option, so it can correct a flag a wrapper (script, Makefile) always passes.

Sections are typed: a dataclass field annotated with another dataclass (``data:
AlignDataConfig``) is built from its mapping by ``from_dict``, recursively, so a config is
checked completely (unknown key, wrong type, bad value) before any work starts, and every
problem is a one-line ``ConfigError`` naming the option by its dotted path.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.resources
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
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


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``5e-4`` and ``1e3`` as strings; YAML 1.2 and every user read
    them as numbers: a float resolver for exponents without a dot."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping; a file that does not parse is a ``ConfigError`` naming it and the line."""
    try:
        with open(path) as f:
            data = _yaml(f) or {}
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
            node[parts[-1]] = _yaml(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw  # a plain string; from_dict checks its type
    return out


def set_values(cfg: dict[str, Any], values: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``cfg`` with ``{"a.b": value}`` written in (intermediate mappings created)."""
    out = copy.deepcopy(cfg)
    for key, val in (values or {}).items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option {key!r}: {part!r} is not a mapping")
        node[parts[-1]] = val
    return out


def flag_values(args: Any, flags: Iterable[str] | Mapping[str, str]) -> dict[str, Any]:
    """``{config key: value}`` of the command-line ``flags`` that were given (not None on
    ``args``). ``flags``: argparse dests named like their field, or ``{dest: "a.b"}``."""
    keys = flags if isinstance(flags, Mapping) else {name: name for name in flags}
    given = {dest: getattr(args, dest, None) for dest in keys}
    return {keys[dest]: val for dest, val in given.items() if val is not None}


def apply_flags(
    cfg: dict[str, Any], args: Any, flags: Iterable[str] | Mapping[str, str]
) -> dict[str, Any]:
    """``cfg`` with the command-line ``flags`` that were given written over it. Apply it
    before ``apply_overrides``: flags beat the YAML, ``--set`` beats both."""
    cfg.update(set_values(cfg, flag_values(args, flags)))
    return cfg


def config_hash(cfg: Any) -> str:
    """Stable short hash of a JSON-able config (dataclass or dict): keys sorted, 16 hex chars."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error, not silently dropped.

    Fields annotated with a dataclass are built from their mapping (recursively), lists become
    tuples where the field is a tuple; ``where`` is the dotted path of ``data`` in its config
    (for the error messages)."""
    if isinstance(data, cls):
        return data
    at = f"{where}: " if where else ""  # where the section sits in its config
    if not isinstance(data, dict):
        raise ConfigError(f"{at}{cls.__name__} options must be a mapping, got {data!r}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{at}Unknown {cls.__name__} option(s): {', '.join(unknown)}. "
            f"Known: {', '.join(sorted(names))}"
        )
    hints = _type_hints(cls)
    kwargs = {}
    for f in fields:
        if f.name not in data:
            continue
        val, hint = data[f.name], hints.get(f.name, f.type)
        path = f"{where}.{f.name}" if where else f.name
        section = _dataclass_of(hint)
        if section is not None and (val is not None or not _allows_none(hint)):
            if not isinstance(val, (dict, section)):
                raise ConfigError(
                    f"{at}{cls.__name__} option {f.name!r} must be dict, got {val!r} "
                    f"({type(val).__name__}): a mapping of {section.__name__} options"
                )
            kwargs[f.name] = from_dict(section, val, path)
            continue
        if isinstance(val, list) and _is_tuple(hint, f.type):
            val = tuple(val)
        _check_type(f"{at}{cls.__name__}", f.name, f.type, val)
        kwargs[f.name] = val
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{at}{cls.__name__}: {e}") from None


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls``; ``{}`` when one names a type its module does not
    import at run time (then only the string checks of ``_check_type`` apply)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _args(hint: Any) -> tuple[Any, ...]:
    return (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None. A union of several
    types (``ABMILHead | TransMILHead | dict``) is left to the class, which knows which
    one a mapping means."""
    alts = [a for a in _args(hint) if a is not type(None)]
    if len(alts) == 1 and isinstance(alts[0], type) and dataclasses.is_dataclass(alts[0]):
        return alts[0]
    return None


def _allows_none(hint: Any) -> bool:
    return type(None) in _args(hint)


def _is_tuple(hint: Any, annotation: Any) -> bool:
    if any(a is tuple or typing.get_origin(a) is tuple for a in _args(hint)):
        return True
    return isinstance(annotation, str) and annotation.startswith("tuple[")


_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}


def _check_type(owner: str, name: str, annotation: Any, val: Any) -> None:
    """Raise ``ConfigError`` when ``val`` does not fit a simple annotation (``int``, ``float``,
    ``str``, ``bool``, ``dict``, ``X | None``); other annotations are left to the class."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = [a.strip() for a in ann.split("|")]
    if val is None and "None" in parts:
        return
    allowed = [_SCALARS[a] for a in parts if a in _SCALARS]
    if not allowed or len(allowed) != len([a for a in parts if a != "None"]):
        return
    # bool is an int subclass in Python, but ``patch_size: true`` is a typo, not 1.
    ok = any(isinstance(val, t) for t in allowed) and (bool in allowed or not isinstance(val, bool))
    if not ok:
        raise ConfigError(
            f"{owner} option {name!r} must be {' or '.join(parts)}, got {val!r} "
            f"({type(val).__name__})"
        )


def load_config(
    cls: type[T],
    path: str | Path | None,
    overrides: list[str] | None = None,
    subdir: str = "",
    flags: Mapping[str, Any] | None = None,
) -> T:
    """YAML file (optional) < ``flags`` (``{"a.b": value}`` of the explicit command-line
    options that were given) < ``overrides`` (``--set a.b=v``) → ``cls`` instance."""
    base = load_yaml(resolve_config_path(path, subdir)) if path else {}
    return from_dict(cls, apply_overrides(set_values(base, flags), overrides))


def non_default(cfg: Any) -> dict[str, Any]:
    """The fields of dataclass ``cfg`` that differ from their defaults (nested sections
    recursively; lists for tuples): what a user set, for a hash that stays the same when a
    new option with a default is added."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if dataclasses.is_dataclass(val) and not isinstance(val, type):
            sub = non_default(val)
            if sub:
                out[f.name] = sub
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory()
                if f.default_factory is not dataclasses.MISSING
                else dataclasses.MISSING
            )
        )
        if val != default:
            out[f.name] = list(val) if isinstance(val, tuple) else val
    return out
