"""Data loading that a resumed run can replay exactly: a seeded per-epoch shuffle (sharded
across DDP ranks) that can start part-way through an epoch without loading the skipped items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from slidefm.io.bags import FeatureBagDataset
from slidefm.runtime import dist_info


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle seeded by seed + epoch, rank-sharded) that can skip the
    first ``start`` indices of its next pass, so a run resumes at a batch inside an epoch.

    Works without a process group: rank and world size default to torchrun's environment.
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ):
        rank, world = dist_info()
        super().__init__(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self._start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of the next pass only (samples, not batches)."""
        self._start = max(0, int(start))

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(list(super().__iter__())[start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self._start)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a ``ResumableSampler``: the loader ``Trainer`` can resume exactly.

    drop_last drops the last incomplete batch of each rank (keeps accumulation exact).
    """
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    gen = torch.Generator().manual_seed(seed)  # worker seeds come from here, not global RNG
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=gen,
        persistent_workers=False,
    )


class BagDataConfig(Protocol):
    """The bag fields that the (frozen) ``data`` sections of ``pretrain`` and ``align`` share;
    read-only members, so frozen dataclasses match."""

    @property
    def max_tiles(self) -> int | None: ...
    @property
    def crop(self) -> Any: ...  # window side in grid cells, [min, max], or None (whole slide)
    @property
    def augment(self) -> bool: ...
    @property
    def cache(self) -> bool: ...
    @property
    def feature_dropout(self) -> float: ...


def training_bags(
    features: str | Path, slide_ids: Sequence[str], data: BagDataConfig, seed: int
) -> FeatureBagDataset:
    """The augmented training bags of a run, built one way for every command (a YAML list
    ``crop`` becomes the (min, max) tuple ``FeatureBagDataset`` expects)."""
    crop = tuple(data.crop) if isinstance(data.crop, list) else data.crop
    return FeatureBagDataset(
        features,
        slide_ids=slide_ids,
        max_tiles=data.max_tiles,
        crop=crop,
        augment=data.augment,
        seed=seed,
        cache=data.cache,
        dropout=data.feature_dropout,
    )
