"""Typed hyper-parameters of each MIL head (``MILConfig.model_kwargs``).

A YAML / ``--set`` mapping such as ``model_kwargs: {hidden: 32}`` becomes the dataclass of the
chosen ``model`` when the config is built, so an unknown or mistyped option is a one-line
``ConfigError`` before any training starts. Defaults are the model constructors' own
(``tests/test_mil_models.py`` checks they agree); ``as_kwargs`` is what the constructor gets
and what a MIL checkpoint records.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PoolHead:
    """``mean`` / ``max``: per-tile MLP width and dropout (``models.mil.PoolMIL``)."""

    hidden: int = 256
    dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class ABMILHead:
    """``abmil``: gated attention MIL (``models.mil.ABMIL``)."""

    hidden: int = 256
    attn_dim: int = 128
    dropout: float = 0.25


@dataclasses.dataclass(frozen=True)
class TransMILHead:
    """``transmil`` (``models.mil.TransMIL``); ``num_landmarks`` None = dim // 2."""

    dim: int = 512
    heads: int = 8
    num_landmarks: int | None = None
    dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class SlideEncoderHead:
    """``slide_encoder``: dropout before the linear head (``models.mil.SlideEncoderMIL``);
    freezing is ``MILConfig.freeze_encoder``."""

    dropout: float = 0.0


HeadConfig = PoolHead | ABMILHead | TransMILHead | SlideEncoderHead
HEAD_CONFIGS: dict[str, type] = {
    "mean": PoolHead,
    "max": PoolHead,
    "abmil": ABMILHead,
    "transmil": TransMILHead,
    "slide_encoder": SlideEncoderHead,
}


def head_config(model: str, options: HeadConfig | dict[str, Any] | None) -> HeadConfig:
    """The typed options of ``model`` from a mapping (YAML / ``--set``) or a head config."""
    from slidefm.config import ConfigError, from_dict

    cls = HEAD_CONFIGS.get(model)
    if cls is None:
        raise ConfigError(f"Unknown --model {model!r}; choose one of {', '.join(HEAD_CONFIGS)}")
    if isinstance(options, cls):
        return options
    if options is None or isinstance(options, dict):
        try:
            return from_dict(cls, options or {})
        except ConfigError as e:
            raise ConfigError(f"model_kwargs of {model}: {e}") from None
    raise ConfigError(f"model_kwargs of {model} must be a mapping, got {options!r}")


def as_kwargs(head: HeadConfig) -> dict[str, Any]:
    """Constructor keyword arguments of a head config."""
    return dataclasses.asdict(head)
