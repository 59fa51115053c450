"""The ``encode-slides`` configuration and the hash that decides whether a slide's feature file
can be reused: every option that changes the numbers in the file, the seed, the device type and
the precision really used."""

from __future__ import annotations

import dataclasses
from typing import Any

from slidefm.config import ConfigError, config_hash, from_dict, non_default
from slidefm.runtime import effective_precision, pick_device
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.modes import ENCODE_CHOICES as CHOICES
from slidefm.wsi.tissue import TissueConfig

# Fields that change the numbers in an output file (and so its config hash).
OUTPUT_FIELDS = (
    "encoder",
    "weights",
    "target_mpp",
    "patch_size",
    "overlap",
    "min_tissue",
    "mpp",
    "stain_norm",
    "feature_dtype",
    "tissue",
    "border_tiles",
)


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    encoder: str = "uni"
    weights: str = "hub"
    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.1
    mpp: float | None = None
    stain_norm: str = "none"
    feature_dtype: str = "float32"
    batch_size: int = 64
    num_workers: int = 2
    region_tiles: int = 8
    device: str = "auto"
    precision: str = "auto"
    qc: bool = True
    max_upsample: float = 1.1
    tissue: TissueConfig = dataclasses.field(default_factory=TissueConfig)
    border_tiles: str = "pad"  # pad: keep partial edge tiles, filled with white | drop

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"encode option {name} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        positive = {
            "batch_size": self.batch_size,
            "patch_size": self.patch_size,
            "region_tiles": self.region_tiles,
            "target_mpp": self.target_mpp,
        }
        for name, v in positive.items():
            if not v > 0:
                raise ConfigError(f"encode option {name} must be > 0, got {v!r}")
        if self.num_workers < 0:
            raise ConfigError(f"encode option num_workers must be ≥ 0, got {self.num_workers}")
        if not 0 <= self.overlap < self.patch_size:
            raise ConfigError(
                f"encode option overlap must be in [0, patch_size={self.patch_size}), got {self.overlap}"
            )
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"encode option min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"encode option mpp must be > 0 µm/px, got {self.mpp}")
        if not self.max_upsample >= 1:
            raise ConfigError(f"encode option max_upsample must be ≥ 1, got {self.max_upsample}")
        if isinstance(self.tissue, dict):  # a library caller's mapping: checked like YAML
            object.__setattr__(self, "tissue", from_dict(TissueConfig, self.tissue, "tissue"))

    def tissue_config(self) -> TissueConfig:
        return self.tissue


def runtime_key(cfg: EncodeConfig) -> dict[str, str]:
    """Device type and the precision really used: both change the features' numbers."""
    device = pick_device(cfg.device)
    return {"device": device.type, "precision": effective_precision(device, cfg.precision)}


def slide_hash(
    cfg: EncodeConfig, job: SlideJob, seed: int, runtime: dict[str, str] | None = None
) -> str:
    d: dict[str, Any] = {k: getattr(cfg, k) for k in OUTPUT_FIELDS}
    d["tissue"] = non_default(cfg.tissue)  # the options set, as the hash always had them
    d["mpp"] = job.mpp if job.mpp is not None else cfg.mpp
    d["seed"] = seed
    d.update(runtime if runtime is not None else runtime_key(cfg))
    return config_hash(d)
