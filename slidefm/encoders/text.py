"""Report text → token ids → text embedding: cleaning, SentencePiece tokenizer, text towers.

Pathology reports are OCR'd, de-identified free text; a subword vocabulary trained on them keeps
terms like "adenocarcinoma" or "pleomorphic" in few pieces, which a generic web BPE does not.

Pipeline (every step deterministic):

1. ``clean_report``: Unicode NFKC, OCR artefacts (line-break full stops inside sentences,
   repeated full stops, stray ``| ~ ^``, spaced hyphens), every de-identification placeholder
   (``XXX``, ``[REDACTED]``, ``<name>``, ``***``) → one token ``[DEID]``, single spaces.
2. ``train_tokenizer``: SentencePiece unigram model on cleaned reports, split into sentences
   (SentencePiece drops lines longer than ``max_sentence_length``), lower-cased by default
   (reports write one finding as "SMALL CELL CARCINOMA" or "small cell carcinoma"; a lower-case
   model carries the marker piece ``<lowercase>``). Identity normalisation and byte fallback,
   so ``decode(encode(x)) == clean_report(x)`` (lower-cased for a lower-case model) for any x.
3. ``ReportTokenizer``: ids of fixed length ``context_length`` = [BOS] pieces [EOS] [PAD]...
   Long reports are **truncated** (the first ``context_length - 2`` pieces are kept: reports
   open with the diagnosis far more often than they end with it) or, with
   ``encode_chunks``, **chunked** into consecutive non-overlapping windows of
   ``context_length - 2`` pieces, each wrapped in BOS/EOS (a report embedding is then the
   normalised mean of its chunk embeddings, see ``models.clip``).
4. Text towers: ``SentencePieceTextTower`` is open_clip's ``TextTransformer`` (causal, pooled
   at EOS, as CLIP) sized by ``TextTowerConfig`` with the tokenizer's vocabulary;
   ``OpenClipTextTower`` is the text half of a pretrained open_clip model with *local* weights
   and that model's own tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from slidefm.io.atomic import atomic_path

log = logging.getLogger(__name__)

DEID_TOKEN = "[DEID]"
LOWERCASE_MARKER = "<lowercase>"  # a piece only in models trained on lower-cased text
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# -- cleaning ------------------------------------------------------------------------------
_PLACEHOLDER_WORDS = (
    r"redacted|removed|deid|de-identified|name|patient(?: name)?|date|dob|mrn|id|accession"
    r"|age|address|phone|institution|hospital|location|physician|doctor|pathologist"
    r"|(?:resident )?signature"
)
_DEID_PATTERNS = [
    r"\b[Xx]{3,}\b",  # XXX, xxxxxxxx
    r"\*{3,}",  # ***
    rf"\[\s*(?:{_PLACEHOLDER_WORDS})\s*\]",
    rf"<\s*(?:{_PLACEHOLDER_WORDS})\s*>",
    r"\((?:MM|DD|YY|YYY|YYYY)(?:/(?:MM|DD|YY|YYY|YYYY)){1,2}\)",  # (MM/DD/YYYY) form masks
]
_DEID_RE = re.compile("|".join(f"(?:{p})" for p in _DEID_PATTERNS), re.IGNORECASE)
_DEID_RUN_RE = re.compile(rf"{re.escape(DEID_TOKEN)}(?:[\s/,]*{re.escape(DEID_TOKEN)})+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u2581]")  # ▁ is SentencePiece's space
_STRAY_RE = re.compile(r"[|^]|~(?!\s?\d)")  # OCR noise; "~60%" (approximately) is kept
# OCR turns each line break into ". ": a full stop between two lower-case words is a line end.
_LINEBREAK_STOP_RE = re.compile(r"(?<=[a-z0-9,;)])\.\s+(?=[a-z])")
_REPEATED_STOP_RE = re.compile(r"\.(?:\s*\.)+")  # ". ." / ".." → "."
_SPACED_HYPHEN_RE = re.compile(r"(?<=[a-z])- (?=[a-z])")  # "non- necrotic" → "non-necrotic"
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+(?=[.,;:])")
_WS_RE = re.compile(r"\s+")
_LEADING_PUNCT_RE = re.compile(r"^[.,;:]+\s*")


def _spaced(m: re.Match, token: str) -> str:
    """``token`` in place of the match, with a space only where it would touch a word."""
    before = m.start() > 0 and m.string[m.start() - 1].isalnum()
    after = m.end() < len(m.string) and m.string[m.end()].isalnum()
    return f"{' ' if before else ''}{token}{' ' if after else ''}"


def clean_report(text: str, deid_token: str = DEID_TOKEN) -> str:
    """Normalise one report for tokenisation (idempotent: ``clean(clean(x)) == clean(x)``).

    NFKC Unicode (ligatures, full-width and compatibility characters), control characters and
    line breaks → spaces, de-identification placeholders → ``deid_token`` (runs of them merged),
    OCR artefacts repaired (see module docstring), whitespace collapsed and stripped.
    Clinical content (numbers, units, case) is never changed. Non-strings (NaN) give "".
    """
    if not isinstance(text, str):
        return ""
    t = unicodedata.normalize("NFKC", text)
    t = _CONTROL_RE.sub(" ", t)
    t = _DEID_RE.sub(lambda m: _spaced(m, deid_token), t)
    t = _DEID_RUN_RE.sub(deid_token, t)
    t = _STRAY_RE.sub(" ", t)
    for _ in range(4):  # the repairs can expose one another ("a . . b"): run to a fixed point
        prev = t
        t = _WS_RE.sub(" ", t)
        t = _REPEATED_STOP_RE.sub(lambda m: ". " if " " in m.group() else ".", t)
        t = _SPACE_BEFORE_PUNCT_RE.sub("", t)
        t = _LINEBREAK_STOP_RE.sub(" ", t)
        t = _SPACED_HYPHEN_RE.sub("-", t)
        t = _LEADING_PUNCT_RE.sub("", t.strip())  # a report cannot start with punctuation
        if t == prev:
            break
    return t


def lowercase_report(text: str) -> str:
    """Lower-case a cleaned report, keeping the ``[DEID]`` token as it is."""
    return text.lower().replace(DEID_TOKEN.lower(), DEID_TOKEN)


def split_sentences(text: str, max_chars: int = 2000) -> list[str]:
    """Cleaned text → sentence-like pieces (split after ``. `` / ``; ``), each ≤ ``max_chars``.

    Used for tokenizer training only: SentencePiece treats a line as a sentence and silently
    skips lines longer than its ``max_sentence_length``.
    """
    out = []
    for s in re.split(r"(?<=[.;])\s+", text):
        s = s.strip()
        while len(s) > max_chars:
            cut = s.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(s[:cut])
            s = s[cut:].strip()
        if s:
            out.append(s)
    return out


# -- tokenizer training --------------------------------------------------------------------
def vocab_size_message(error: str, vocab_size: int, n_sentences: int) -> str:
    """SentencePiece's vocabulary-size failure → which bound was crossed, with its value.

    The minimum is the corpus's required characters plus the meta pieces (4 special ids, the
    256 byte-fallback pieces, the user symbols); the maximum is what the corpus can supply.
    SentencePiece computes both and states them in its error; we name them as such.
    """
    low = re.search(r"smaller than required_chars\. *(\d+) vs (\d+)", error)
    if low:
        return (
            f"--vocab-size {vocab_size} is below the minimum {low.group(2)} for this corpus "
            "(its distinct characters + 4 special ids + 256 byte pieces + user symbols): "
            f"raise it to at least {low.group(2)}"
        )
    high = re.search(r"value <= *(\d+)", error)
    if high:
        return (
            f"--vocab-size {vocab_size} is above the maximum {high.group(1)} that this corpus "
            f"({n_sentences} sentences) supports: lower it to at most {high.group(1)}, or add "
            "reports"
        )
    return f"SentencePiece failed for --vocab-size {vocab_size}: {error.strip().splitlines()[0]}"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | Path,
    seed: int = 0,
    model_type: str = "unigram",
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
    clean: bool = True,
    hard_vocab_limit: bool = True,
    lowercase: bool = True,
) -> Path:
    """Train a SentencePiece model on report texts and write ``out_path`` (``.model``) atomically.

    Deterministic for a given (texts, arguments, seed): when there are more sentences than
    ``input_sentence_size`` they are subsampled here with ``numpy.random.default_rng(seed)``
    (SentencePiece's own shuffle is off) and SentencePiece's RNG is seeded with ``seed``.
    The model also depends on ``num_threads`` (SentencePiece splits its EM work by thread): a
    given thread count is reproducible, a different one gives a slightly different vocabulary,
    so it is recorded with the model by the CLI. Ids: pad 0, unk 1, bos 2, eos 3; ``[DEID]`` is a single user-defined piece; byte
    fallback means no character is ever unknown (the 256 byte pieces count in ``vocab_size``).
    ``hard_vocab_limit=False`` lets a small corpus yield fewer pieces than asked for instead of
    failing. ``lowercase`` (default; reports mix upper- and lower-case for the same finding)
    trains on lower-cased text and marks the model with the piece ``<lowercase>``, so
    ``ReportTokenizer`` lower-cases its inputs too.
    """
    import sentencepiece as spm

    if vocab_size < 16:
        raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
    sentences = []
    for t in texts:
        t = clean_report(t) if clean else str(t)
        sentences.extend(split_sentences(lowercase_report(t) if lowercase else t))
    if not sentences:
        raise ValueError("no report text to train the tokenizer on (all texts empty?)")
    if len(sentences) > input_sentence_size:
        keep = np.random.default_rng(seed).choice(len(sentences), input_sentence_size, False)
        sentences = [sentences[i] for i in np.sort(keep)]
    spm.set_random_generator_seed(int(seed))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=int(vocab_size),
            model_type=model_type,
            character_coverage=character_coverage,
            normalization_rule_name="identity",  # clean_report already normalised (NFKC)
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            byte_fallback=True,
            split_digits=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=[DEID_TOKEN] + ([LOWERCASE_MARKER] if lowercase else []),
            input_sentence_size=0,  # 0 = all (subsampled above, deterministically)
            shuffle_input_sentence=False,
            max_sentence_length=8192,
            hard_vocab_limit=hard_vocab_limit,
            num_threads=int(num_threads),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(vocab_size_message(str(e), vocab_size, len(sentences))) from e
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(model.getvalue())
    return out_path


# -- tokenizers ----------------------------------------------------------------------------
class TextTokenizer(Protocol):
    """What a text tower needs from a tokenizer."""

    context_length: int

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


class ReportTokenizer:
    """A SentencePiece model used at a fixed context length (see module docstring).

    Built from a ``.model`` file or its bytes (``from_bytes``: checkpoints embed the model so
    they are self-contained). ``clean`` applies ``clean_report`` before encoding.
    """

    def __init__(self, model: str | Path | bytes, context_length: int = 128, clean: bool = True):
        import sentencepiece as spm

        if isinstance(model, bytes):
            self.model_bytes = model
        else:
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(
                    f"tokenizer model {path} not found; train one with "
                    "`slidefm train-tokenizer --reports CSV --vocab-size V --out tok.model`"
                )
            self.model_bytes = path.read_bytes()
        if context_length < 3:
            raise ValueError("context_length must be >= 3 (BOS, at least one piece, EOS)")
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.context_length = int(context_length)
        self.clean = clean
        self.lowercase = self.sp.piece_to_id(LOWERCASE_MARKER) != self.sp.unk_id()
        for name, want in (("pad", PAD_ID), ("bos", BOS_ID), ("eos", EOS_ID)):
            got = getattr(self.sp, f"{name}_id")()
            if got != want:
                raise ValueError(
                    f"tokenizer {name}_id is {got}, expected {want}: use a model written by "
                    "slidefm train-tokenizer"
                )

    @classmethod
    def from_bytes(cls, data: bytes, context_length: int = 128, clean: bool = True):
        return cls(data, context_length=context_length, clean=clean)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def normalize(self, text: str) -> str:
        """The text the pieces spell: cleaned, and lower-cased for a lower-case model.
        ``decode(encode(x)) == normalize(x)`` when x fits the context."""
        t = clean_report(text) if self.clean else text
        return lowercase_report(t) if self.lowercase else t

    def pieces(self, text: str) -> list[int]:
        """Piece ids of one text, without BOS/EOS and without truncation."""
        return list(self.sp.encode(self.normalize(text)))

    def _wrap(self, ids: Sequence[int]) -> list[int]:
        body = list(ids)[: self.context_length - 2]
        row = [BOS_ID, *body, EOS_ID]
        return row + [PAD_ID] * (self.context_length - len(row))

    def encode(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Texts → int64 ids [B, context_length]: BOS, the first L-2 pieces, EOS, then PAD."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self._wrap(self.pieces(t)) for t in texts], dtype=torch.long)

    __call__ = encode

    def encode_chunks(
        self, texts: Sequence[str], max_chunks: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every text's pieces in consecutive windows of L-2 → (ids [M, L], owner [M]).

        ``owner[m]`` is the index of the text chunk m comes from; an empty text gives one chunk
        (BOS, EOS). ``max_chunks`` keeps the first chunks of each text.
        """
        rows, owner = [], []
        step = self.context_length - 2
        for i, t in enumerate(texts):
            ids = self.pieces(t)
            starts = list(range(0, max(1, len(ids)), step))[:max_chunks]
            for s in starts:
                rows.append(self._wrap(ids[s : s + step]))
                owner.append(i)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(owner, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids (one row, with or without BOS/EOS/PAD) → text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        body = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
        return self.sp.decode(body)


class OpenClipTokenizer:
    """open_clip's tokenizer for a pretrained text tower, applied to cleaned reports."""

    def __init__(self, model_name: str, context_length: int | None = None, clean: bool = True):
        import open_clip

        try:
            self.tok = open_clip.get_tokenizer(model_name, context_length=context_length)
        except Exception as e:  # HF tokenizers need the hub cache
            raise FileNotFoundError(
                f"open_clip tokenizer for {model_name!r} is not available offline ({e}); "
                "fill the Hugging Face cache on a machine with internet and set HF_HUB_OFFLINE=1"
            ) from e
        self.context_length = int(context_length or getattr(self.tok, "context_length", 77))
        self.clean = clean

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = [clean_report(t) if self.clean else t for t in texts]
        return self.tok(texts, context_length=self.context_length)


# -- text towers ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """A text tower: ``kind`` sentencepiece (our tokenizer + open_clip TextTransformer, trained
    from scratch) or open_clip (a pretrained open_clip model's text half, its own tokenizer)."""

    kind: str = "sentencepiece"  # sentencepiece | open_clip
    context_length: int = 128
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    output_dim: int = 256  # the tower's own projection (joint-space heads follow in clip.py)
    long_text: str = "truncate"  # truncate | chunk (mean of normalised chunk embeddings)
    max_chunks: int = 8
    pool: str = "eos"  # eos (causal, CLIP) | mean (bidirectional, mean of non-pad tokens)
    # open_clip kind only:
    model_name: str = ""  # e.g. ViT-B-32, or a name registered with open_clip.add_model_config
    pretrained: str = ""  # local checkpoint path, an open_clip tag (HF cache), or "random"

    def __post_init__(self) -> None:
        if self.kind not in ("sentencepiece", "open_clip"):
            raise ValueError(f"text.kind must be sentencepiece or open_clip, not {self.kind!r}")
        if self.pool not in ("eos", "mean"):
            raise ValueError(f"text.pool must be eos or mean, not {self.pool!r}")
        if self.long_text not in ("truncate", "chunk"):
            raise ValueError(f"text.long_text must be truncate or chunk, not {self.long_text!r}")
        if self.kind == "sentencepiece" and self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


class SentencePieceTextTower(nn.Module):
    """open_clip ``TextTransformer`` over our SentencePiece ids.

    ``pool=eos``: causal attention, the EOS token's state (CLIP). ``pool=mean``: bidirectional
    attention with padding masked, mean of the non-pad token states (BOS/EOS included) — a
    report is closer to a set of findings than to a sentence, and a mean lets a short prompt
    and a long report share their key terms' contribution.
    forward(ids [B, L] int64) → [B, output_dim] (not normalised).
    """

    def __init__(self, cfg: TextTowerConfig, vocab_size: int):
        from open_clip.transformer import TextTransformer

        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim
        self.transformer = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=cfg.output_dim,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            pool_type="eos" if cfg.pool == "eos" else "none",
            no_causal_mask=cfg.pool == "mean",
            use_pad_mask=cfg.pool == "mean",
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.transformer(ids)  # [B, D] (eos) or [B, L, D] (mean: every token projected)
        if self.cfg.pool == "eos":
            return out
        keep = (ids != PAD_ID).unsqueeze(-1).to(out.dtype)
        return (out * keep).sum(1) / keep.sum(1).clamp(min=1)


def _resolve_open_clip_weights(model_name: str, pretrained: str) -> str:
    """A local file, or the path of an open_clip tag's file in the HF cache (never downloads)."""
    import open_clip

    if not pretrained:
        raise ValueError(
            f"open_clip text tower {model_name!r} needs text.pretrained: a local checkpoint "
            "path or an open_clip pretrained tag (see open_clip.list_pretrained())"
        )
    p = Path(pretrained).expanduser()
    if p.is_file():
        return str(p)
    if pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in pretrained:
        raise FileNotFoundError(f"open_clip text-tower checkpoint {p} does not exist")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model_name!r}; "
            f"known tags: {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the cache, never the net
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:
        raise FileNotFoundError(
            f"weights {model_name}/{pretrained} are not in the local Hugging Face cache ({e}). "
            f"Download them on a machine with internet (open_clip.create_model('{model_name}', "
            f"pretrained='{pretrained}')), copy $HF_HOME, or pass a local file as text.pretrained"
        ) from e


class OpenClipTextTower(nn.Module):
    """The text half of a pretrained open_clip model (vision tower dropped), local weights only.

    forward(ids [B, L] from ``OpenClipTokenizer``) → [B, output_dim] (not normalised).
    """

    def __init__(self, cfg: TextTowerConfig):
        import open_clip

        super().__init__()
        self.cfg = cfg
        if cfg.pretrained == "random":  # the one spelling of random weights (tests, ablations)
            log.warning("RANDOM WEIGHTS: open_clip text tower %r is untrained", cfg.model_name)
            weights = None
        else:
            weights = _resolve_open_clip_weights(cfg.model_name, cfg.pretrained)
        model = open_clip.create_model(cfg.model_name, pretrained=weights, device="cpu")
        model.visual = None  # keeps only the text tower (and logit_scale) in the state dict
        self.model = model
        self.weights = weights or "random"
        proj = getattr(model, "text_projection", None)
        if proj is None and hasattr(model, "text"):
            proj = getattr(model.text, "text_projection", None)
        self.output_dim = int(
            proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)


def build_text_tower(
    cfg: TextTowerConfig, tokenizer_model: str | Path | bytes | None = None
) -> tuple[nn.Module, Any]:
    """(tower, tokenizer) for ``cfg``; the sentencepiece kind needs the tokenizer model."""
    if cfg.kind == "open_clip":
        tok = OpenClipTokenizer(cfg.model_name, cfg.context_length)
        return OpenClipTextTower(cfg), tok
    if tokenizer_model is None:
        raise ValueError("a sentencepiece text tower needs --tokenizer tok.model")
    tok = ReportTokenizer(tokenizer_model, context_length=cfg.context_length)
    return SentencePieceTextTower(cfg, tok.vocab_size), tok


# -- registry ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextTowerEntry:
    """One text tower: ``TextTowerConfig`` fields that define it, and where weights come from."""

    name: str
    description: str
    config: dict[str, Any]  # TextTowerConfig fields (overridable in ``create_text_tower``)
    weights: str  # in words: what ``weights=`` accepts besides "random"


TEXT_TOWERS: dict[str, TextTowerEntry] = {
    e.name: e
    for e in (
        TextTowerEntry(
            "sentencepiece",
            "open_clip TextTransformer over slidefm's report SentencePiece ids, EOS-pooled (CLIP)",
            {"kind": "sentencepiece", "pool": "eos"},
            "PATH: an alignment checkpoint (<align out>/align.pt) with this tower",
        ),
        TextTowerEntry(
            "sentencepiece_mean",
            "as sentencepiece, bidirectional with the mean of the non-pad tokens",
            {"kind": "sentencepiece", "pool": "mean"},
            "PATH: an alignment checkpoint (<align out>/align.pt) with this tower",
        ),
        TextTowerEntry(
            "open_clip",
            "text half of a pretrained open_clip model (model_name=…), its own tokenizer",
            {"kind": "open_clip"},
            "an open_clip pretrained tag (local HF cache) or a local checkpoint file",
        ),
    )
}


def list_text_towers() -> list[str]:
    """Registered text-tower names (``slidefm text-towers list``)."""
    return list(TEXT_TOWERS)


def get_text_tower_entry(name: str) -> TextTowerEntry:
    if name not in TEXT_TOWERS:
        raise ValueError(f"unknown text tower {name!r}; choose one of {', '.join(TEXT_TOWERS)}")
    return TEXT_TOWERS[name]


def text_tower_config(name: str, **overrides: Any) -> TextTowerConfig:
    """The entry's ``TextTowerConfig`` with field overrides (a bad field is a ConfigError)."""
    from slidefm.config import ConfigError, from_dict

    entry = get_text_tower_entry(name)
    fixed = {k: v for k, v in overrides.items() if k in entry.config and v != entry.config[k]}
    if fixed:
        raise ConfigError(f"text tower {name!r} fixes {', '.join(sorted(fixed))}")
    return from_dict(TextTowerConfig, {**entry.config, **overrides})


def create_text_tower(
    name: str,
    weights: str | Path = "random",
    tokenizer: str | Path | bytes | None = None,
    vocab_size: int | None = None,
    **config: Any,
) -> nn.Module:
    """Build text tower ``name`` (``list_text_towers()``) with ``weights``.

    weights: ``"random"`` (seeded initialisation; logged as untrained), or for the sentencepiece
    towers an alignment checkpoint (its text tower, config and tokenizer), for ``open_clip`` an
    open_clip pretrained tag or a local file. ``tokenizer``: a SentencePiece ``.model`` (or its
    bytes) for the sentencepiece towers; or ``vocab_size`` alone, when only ids are fed.
    ``**config``: ``TextTowerConfig`` fields (``model_name`` for open_clip). The tower is in eval
    mode, with ``tokenizer`` (None when built from ``vocab_size``) and ``weights_id``.
    """
    entry = get_text_tower_entry(name)
    if entry.config["kind"] == "open_clip":
        cfg = text_tower_config(name, **{**config, "pretrained": str(weights)})
        if not cfg.model_name:
            raise ValueError("text tower open_clip needs model_name=… (e.g. ViT-B-32)")
        tower: nn.Module = OpenClipTextTower(cfg)
        # the model's own context length unless one is asked for (TextTowerConfig's default
        # 128 is the sentencepiece towers')
        tower.tokenizer = OpenClipTokenizer(cfg.model_name, config.get("context_length"))
        tower.weights_id = tower.weights
        return tower.eval()
    if str(weights) != "random":
        return _tower_from_align_checkpoint(name, Path(weights), config)
    log.warning("RANDOM WEIGHTS: text tower %r is untrained", name)
    cfg = text_tower_config(name, **config)
    tok = None
    if tokenizer is not None:
        tok = ReportTokenizer(tokenizer, context_length=cfg.context_length)
        vocab_size = tok.vocab_size
    if vocab_size is None:
        raise ValueError(f"text tower {name!r} needs tokenizer=tok.model (or vocab_size=V)")
    tower = SentencePieceTextTower(cfg, int(vocab_size))
    tower.tokenizer, tower.weights_id = tok, "random"
    return tower.eval()


def _tower_from_align_checkpoint(name: str, path: Path, config: dict[str, Any]) -> nn.Module:
    """The text tower inside a ``slidefm align`` checkpoint (its config and tokenizer)."""
    from slidefm.io.checkpoints import read_checkpoint

    if config:
        raise ValueError("an alignment checkpoint records its text tower: pass weights=PATH alone")
    payload = read_checkpoint(path, "align")
    cfg = text_tower_config(name, **(payload["config"]["model"].get("text") or {}))
    tok = ReportTokenizer(payload["config"]["tokenizer"], context_length=cfg.context_length)
    tower = SentencePieceTextTower(cfg, tok.vocab_size)
    prefix = "text_tower."
    sd = {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    tower.load_state_dict(sd)
    tower.tokenizer, tower.weights_id = tok, f"{path.name}@sha256:{payload.get('sha256')}"
    return tower.eval()
