"""Slide–report pairs for contrastive alignment, one item per *patient*.

A patient's report describes all of its slides, so two slides of one patient in a batch would
be false negatives of each other. Items are therefore cases: each draws one of its slides
(seeded by (seed, epoch, case index), like ``FeatureBagDataset``, so a resumed run sees the
same batches) and the case's report, optionally augmented by dropping/shuffling sentences.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from slidefm.io.bags import FeatureBagDataset, collate_bags, item_rng

_SENT_RE = re.compile(r"(?<=[.;])\s+")


def augment_report(
    text: str, rng: np.random.Generator, drop: float = 0.0, shuffle: bool = False
) -> str:
    """Drop each sentence with probability ``drop`` (at least one is kept), optionally shuffle.

    Sentences are split after ``.``/``;``. Teaches the text tower that a report is a set of
    findings, so short prompts land near the reports that contain their finding.
    """
    if drop <= 0 and not shuffle:
        return text
    sents = [s for s in _SENT_RE.split(text) if s.strip()]
    if len(sents) <= 1:
        return text
    keep = [s for s in sents if rng.random() >= drop] or [sents[int(rng.integers(len(sents)))]]
    if shuffle:
        keep = [keep[i] for i in rng.permutation(len(keep))]
    return " ".join(keep)


class SlideReportPairs(Dataset):
    """Cases as (slide, report) pairs.

    case_slides: per case, indices of its slides into ``bags`` (a ``FeatureBagDataset``) or
    into the rows of ``embeddings`` [N_slides, E]; reports: one text per case.
    tokenize(texts) -> {"text": ids [M, L], optional "text_owner" [M]} for one text.
    Item: {"slide_id", "case_index", "text" ids [m, L]} plus the bag's ``features``/``grid``
    or ``embeddings`` [E].
    """

    def __init__(
        self,
        case_slides: Sequence[Sequence[int]],
        reports: Sequence[str],
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        bags: FeatureBagDataset | None = None,
        embeddings: np.ndarray | None = None,
        slide_ids: Sequence[str] | None = None,
        seed: int = 0,
        sentence_dropout: float = 0.0,
        shuffle_sentences: bool = False,
    ):
        if (bags is None) == (embeddings is None):
            raise ValueError("give exactly one of bags (tile features) or embeddings")
        if len(case_slides) != len(reports):
            raise ValueError(f"{len(case_slides)} cases but {len(reports)} reports")
        if any(len(s) == 0 for s in case_slides):
            raise ValueError("every case needs at least one slide")
        self.case_slides = [list(map(int, s)) for s in case_slides]
        self.reports = list(reports)
        self.tokenize = tokenize
        self.bags = bags
        self.embeddings = None if embeddings is None else np.asarray(embeddings, np.float32)
        self.slide_ids = list(slide_ids) if slide_ids is not None else None
        self.seed = seed
        self.epoch = 0
        self.sentence_dropout = sentence_dropout
        self.shuffle_sentences = shuffle_sentences

    def __len__(self) -> int:
        return len(self.case_slides)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.bags is not None:
            self.bags.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = item_rng(self.seed + 7919, self.epoch, index)  # offset: not the bags' stream
        slides = self.case_slides[index]
        s = slides[int(rng.integers(len(slides)))]
        text = augment_report(
            self.reports[index], rng, self.sentence_dropout, self.shuffle_sentences
        )
        item: dict[str, Any] = {"case_index": index, "text": self.tokenize([text])["text"]}
        if self.bags is not None:
            bag = self.bags[s]
            keys = ("features", "grid", "slide_id", "coords", "patch_size_level0")
            item.update({k: bag[k] for k in keys if k in bag})  # coords: published encoders
        else:
            item["embeddings"] = torch.from_numpy(self.embeddings[s])
            item["slide_id"] = self.slide_ids[s] if self.slide_ids else str(s)
        return item


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of pairs: slides as ``collate_bags`` (or stacked ``embeddings`` [B, E]); ``text``
    [M, L] with ``text_owner`` [M] (chunk → batch row) when a report has several chunks."""
    if "features" in items[0]:
        out = collate_bags(items)
    else:
        out = {
            "embeddings": torch.stack([it["embeddings"] for it in items]),
            "slide_id": [it["slide_id"] for it in items],
        }
    texts = [it["text"] for it in items]
    out["text"] = torch.cat(texts)
    if any(len(t) != 1 for t in texts):
        out["text_owner"] = torch.repeat_interleave(
            torch.arange(len(texts)), torch.tensor([len(t) for t in texts])
        )
    return out
