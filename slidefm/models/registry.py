"""Slide-encoder registry: ``create_slide_encoder(name, weights=...)`` / ``list_slide_encoders()``.

In the spirit of timm's ``create_model``. Two kinds of entries:

* slidefm's own configs (``configs/slide_encoder/*.yaml``: ``titan_like``, ``gigapath_like``,
  ``small``, ``tiny``, …) → :class:`~slidefm.models.slide_encoder.SlideEncoder`; weights are
  ``"random"``, a ``slidefm pretrain`` checkpoint path, or its state dict;
* published models (``gigapath``, ``titan``, ``chief``) → the restatements in
  ``slidefm.models.published``; weights are ``"hub"`` (Hugging Face cache, honours
  ``HF_HUB_OFFLINE``), a local file or snapshot folder in the published layout, an in-memory
  state dict in the published layout, or ``"random"`` (only when asked).

Published keys are turned into ours by the converter beside each entry (timm's
``checkpoint_filter_fn`` pattern) and loaded strictly: a missing, unexpected or misshapen key
is a ValueError listing them, never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slidefm.config import CONFIG_DIR, ConfigError
from slidefm.encoders.registry import (
    _file_sha256,
    read_state_dict,
    sha256_file,
    state_dict_mismatch,
)
from slidefm.models.published.chief import ChiefSlideEncoder, convert_chief, export_chief
from slidefm.models.published.gigapath import (
    GigaPathSlideEncoder,
    convert_gigapath,
    export_gigapath,
)
from slidefm.models.published.titan import TitanSlideEncoder, convert_titan, export_titan

WeightsArg = str | Path | Mapping[str, torch.Tensor]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SlideEncoderEntry:
    """One registry entry: what the encoder expects, what it gives, where its weights are."""

    name: str
    kind: str  # "published" | "slidefm"
    description: str
    tile_encoder: str | None  # expected tile encoder (None = any with ``input_dim`` features)
    tile_size: int | None  # tile side in px at ``mpp``
    mpp: float | None  # µm/px of the tiles
    input_dim: int
    output_dim: int
    licence: str
    weight_source: str  # where the published weights live, in words
    readouts: tuple[str, ...] = ("cls",)
    tile_encoder_aliases: tuple[str, ...] = ()  # names feature files may record for it
    hub_repo: str | None = None
    hub_files: tuple[str, ...] = ()
    build: Callable[..., nn.Module] | None = None
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    export: Callable[[dict[str, torch.Tensor]], dict[str, Any]] | None = None  # convert⁻¹
    export_file: str | None = None  # file name of weights saved in the published layout
    config: str | None = None  # slidefm YAML (kind "slidefm")

    def accepts_tile_encoder(self, recorded: str | None) -> bool | None:
        """True/False when ``recorded`` (a feature file's encoder attr) is known; None if unknown."""
        if self.tile_encoder is None:
            return True
        if not recorded or recorded.lower() in ("unknown", "none", ""):
            return None
        names = {self.tile_encoder, *self.tile_encoder_aliases}
        norm = {n.lower().replace("-", "_").replace(".", "_") for n in names}
        return recorded.lower().replace("-", "_").replace(".", "_") in norm


PUBLISHED: dict[str, SlideEncoderEntry] = {
    "gigapath": SlideEncoderEntry(
        name="gigapath",
        kind="published",
        description="Prov-GigaPath slide encoder gigapath_slide_enc12l768d (LongNet, 12 × 768)",
        tile_encoder="gigapath",
        tile_encoder_aliases=("prov-gigapath", "prov_gigapath", "gigapath_tile_enc"),
        tile_size=256,
        mpp=0.5,
        input_dim=1536,
        output_dim=768,
        licence="Apache-2.0 (code); model weights: Prov-GigaPath licence on the HF model card",
        weight_source="hf: prov-gigapath/prov-gigapath slide_encoder.pth ({'model': state_dict})",
        readouts=GigaPathSlideEncoder.readouts,
        hub_repo="prov-gigapath/prov-gigapath",
        hub_files=("slide_encoder.pth",),
        build=GigaPathSlideEncoder,
        convert=convert_gigapath,
        export=export_gigapath,
        export_file="slide_encoder.pth",
    ),
    "titan": SlideEncoderEntry(
        name="titan",
        kind="published",
        description="TITAN-preview vision tower (2D-ALiBi ViT, 6 × 768, attentional pooling)",
        tile_encoder="conch_v15",
        tile_encoder_aliases=("conch_v1_5", "conchv1_5", "conch_v1.5"),
        tile_size=512,
        mpp=0.5,
        input_dim=768,
        output_dim=768,
        licence="CC BY-NC-ND 4.0 (model; gated, research use)",
        weight_source="hf: MahmoodLab/TITAN (vision_encoder.* keys; text_encoder.* ignored)",
        readouts=TitanSlideEncoder.readouts,
        hub_repo="MahmoodLab/TITAN",
        hub_files=("model.safetensors", "pytorch_model.bin"),
        build=TitanSlideEncoder,
        convert=convert_titan,
        export=export_titan,
        export_file="model.safetensors",
    ),
    "chief": SlideEncoderEntry(
        name="chief",
        kind="published",
        description="CHIEF slide encoder (gated attention pooling of CTransPath features)",
        tile_encoder="ctranspath",
        tile_encoder_aliases=("chief_ctranspath", "ctrans_path"),
        tile_size=256,
        mpp=0.5,
        input_dim=768,
        output_dim=768,
        licence="AGPL-3.0 (code); weights: CHIEF terms (research use)",
        weight_source="CHIEF_pretraining.pth (Google Drive link in the hms-dbmi/CHIEF README)",
        readouts=ChiefSlideEncoder.readouts,
        build=ChiefSlideEncoder,
        convert=convert_chief,
        export=export_chief,
        export_file="CHIEF_pretraining.pth",
    ),
}


def _config_entries() -> dict[str, SlideEncoderEntry]:
    from slidefm.config import load_yaml

    out = {}
    for path in sorted((CONFIG_DIR / "slide_encoder").glob("*.yaml")):
        cfg = load_yaml(path)
        out[path.stem] = SlideEncoderEntry(
            name=path.stem,
            kind="slidefm",
            description=f"slidefm config configs/slide_encoder/{path.name}",
            tile_encoder=None,
            tile_size=None,
            mpp=None,
            input_dim=int(cfg.get("input_dim", 768)),
            output_dim=int(cfg.get("d_model", 768)),
            licence="Apache-2.0 (slidefm)",
            weight_source="`slidefm pretrain` checkpoint (<out>/encoder.pt); no published weights",
            readouts=(str(cfg.get("readout", "cls")),),
            config=str(path),
        )
    return out


def list_slide_encoders(kind: str | None = None) -> list[str]:
    """Registered names: published models first, then slidefm's configs."""
    names = [*PUBLISHED, *(n for n in _config_entries() if n not in PUBLISHED)]
    return [n for n in names if kind is None or get_entry(n).kind == kind]


def get_entry(name: str) -> SlideEncoderEntry:
    if name in PUBLISHED:
        return PUBLISHED[name]
    entries = _config_entries()
    if name not in entries:
        raise ValueError(
            f"unknown slide encoder {name!r}; choose one of {', '.join(list_slide_encoders())}"
        )
    return entries[name]


def is_published(model: nn.Module) -> bool:
    from slidefm.models.published.base import PublishedSlideEncoder

    return isinstance(model, PublishedSlideEncoder)


# ------------------------------------------------------------------------------------ weights


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def hub_weights(entry: SlideEncoderEntry) -> Path:
    """The entry's weight file from the Hugging Face cache (downloaded when online)."""
    if entry.hub_repo is None:
        raise FileNotFoundError(
            f"slide encoder {entry.name!r} has no weights on the Hugging Face hub "
            f"({entry.weight_source}); download them and pass --weights PATH"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    errors = []
    for filename in entry.hub_files:
        try:
            return Path(hf_hub_download(entry.hub_repo, filename))
        except (LocalEntryNotFoundError, EntryNotFoundError) as e:
            errors.append(f"{filename}: {type(e).__name__}")
        except (HfHubHTTPError, OSError) as e:  # gated/401/403, network
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0]}")
    where = " offline (HF_HUB_OFFLINE=1)" if _hub_offline() else ""
    raise FileNotFoundError(
        f"weights of slide encoder {entry.name!r} ({entry.hub_repo}) are not available{where}: "
        f"{'; '.join(errors)}. Fill the HF cache on a machine with internet "
        f"(huggingface-cli download {entry.hub_repo} {' '.join(entry.hub_files[:1])}; gated "
        "models need an accepted licence and HF_TOKEN), or pass --weights PATH"
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file, or a snapshot folder (all its *.safetensors, else *.bin / *.pth)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(
            [*path.glob("*.bin"), *path.glob("*.pth"), *path.glob("*.pt")]
        )
        if not files:
            raise FileNotFoundError(f"no *.safetensors / *.bin / *.pth weight files in {path}")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(_read_file(f))
        return sd
    if not path.is_file():
        raise FileNotFoundError(f"slide-encoder weights {str(path)!r} not found")
    return _read_file(path)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    from slidefm.io.torch_file import load_torch_file

    sd = load_torch_file(path, "slide-encoder weights", map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_published_state(
    model: nn.Module, entry: SlideEncoderEntry, sd: Mapping[str, Any], source: str
) -> None:
    """Convert ``sd`` (published layout) and load it strictly into ``model``."""
    sd = entry.convert(dict(sd)) if entry.convert else dict(sd)
    own = model.state_dict()
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise ValueError(
            f"weights {source} do not match slide encoder {entry.name!r}{problems}\n"
            f"(expected the published layout of {entry.weight_source})"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def save_published_weights(model: nn.Module, path: str | Path) -> Path:
    """Write a published encoder's weights in its published layout (``entry.export``), so
    that ``--weights PATH`` and the original code read them as they read the downloaded
    file: continued pretraining hands back a drop-in replacement. ``.safetensors`` or a
    torch file by suffix; written to a temporary name and renamed (never half-written)."""
    entry = model.registry_entry
    if entry.export is None:
        raise ValueError(f"slide encoder {entry.name!r} has no published layout to export")
    from slidefm.io.atomic import atomic_path

    sd = entry.export({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)
    return path


def _build(entry: SlideEncoderEntry, arch: dict[str, Any]) -> nn.Module:
    if entry.kind == "slidefm":
        from slidefm.models.slide_encoder import SlideEncoder

        try:
            return SlideEncoder.from_config(entry.config, **arch)
        except TypeError as e:
            raise ConfigError(f"slide encoder {entry.name!r}: {e}") from e
    allowed = [p for p in inspect.signature(entry.build).parameters]
    bad = sorted(set(arch) - set(allowed))
    if bad:
        raise ValueError(
            f"slide encoder {entry.name!r} has no option(s) {bad}; allowed: {', '.join(allowed)}"
        )
    return entry.build(**arch)


def create_slide_encoder(name: str, weights: WeightsArg = "random", **arch: Any) -> nn.Module:
    """Build registry entry ``name`` and load ``weights``.

    weights: ``"random"``, ``"hub"`` (published entries), a path (file or snapshot folder; a
    ``slidefm pretrain`` checkpoint for slidefm configs), or a state dict (published layout for
    published entries). ``**arch``: architecture overrides (e.g. ``input_dim``, ``embed_dim``,
    ``depth``, ``num_heads``; slidefm configs take SlideEncoderConfig fields). The returned
    module has ``weights_id`` (what was loaded: "random", "<file>@sha256:<hex>", "state_dict")
    and ``registry_entry``; it is in eval mode.
    """
    entry = get_entry(name)
    model = _build(entry, arch)
    weights_id = "random"
    if isinstance(weights, Mapping):
        if entry.kind == "slidefm":
            model.load_state_dict(dict(weights), strict=True)
        else:
            load_published_state(model, entry, weights, "(state dict)")
        weights_id = "state_dict"
    elif str(weights) != "random":
        if str(weights) == "hub":
            if entry.kind == "slidefm":
                raise ValueError(
                    f"slidefm config {name!r} has no published weights: pass a `slidefm "
                    "pretrain` checkpoint (--weights PATH) or --weights random"
                )
            path = hub_weights(entry)
        else:
            path = Path(str(weights)).expanduser()
            if not path.exists():
                raise FileNotFoundError(
                    f"weights {str(path)!r} for slide encoder {name!r} not found "
                    f"({entry.weight_source}); or use --weights hub / --weights random"
                )
        if entry.kind == "slidefm":
            model.load_checkpoint(path)
        else:
            load_published_state(model, entry, read_weights(path), str(path))
        weights_id = f"{path.name}@sha256:{_file_sha256(path)}" if path.is_file() else str(path)
    model.weights_id = weights_id
    model.registry_entry = entry
    model.arch_overrides = dict(arch)
    return model.eval()


# ------------------------------------------------------------------ one grammar for commands

RANDOM = "random"
OLD_RANDOM_PREFIX = "random:"  # deprecated: "random:<config>" (align, before the registry)


def deprecated_spelling(old: str, new: str) -> None:
    """Log, once per call, that ``old`` still works but ``new`` is the spelling."""
    log.warning("DEPRECATED: %s still works but will be removed; write %s", old, new)


def slide_encoder_from_spec(
    spec: str, weights: str | None = None, input_dim: int | None = None
) -> tuple[nn.Module, dict[str, str]]:
    """The one grammar every command uses for "which slide encoder, which weights".

    ``spec``: a slidefm checkpoint file (self-describing: ``weights`` must be unset), or a
    registry name (``slidefm slide-encoders list``) with ``weights`` = ``random`` | ``hub`` |
    PATH — random weights are always ``NAME`` + ``--weights random``. ``input_dim``: the tile
    feature width a random slidefm config is built for. The spellings from before the registry
    keep working with a DEPRECATED warning naming the new one: ``random:<config>`` and a bare
    config name (both meant random weights).

    Returns (encoder, provenance): ``slide_encoder`` (name or absolute path),
    ``slide_encoder_weights`` (``random`` | ``pretrained``), ``slide_encoder_sha256``
    (file sha256, or ``random``).
    """
    path = Path(spec).expanduser()
    is_yaml = path.suffix in (".yaml", ".yml")
    if path.is_file() and not is_yaml:
        return _from_checkpoint_file(path, spec, weights, input_dim)
    name = spec
    if spec.startswith(OLD_RANDOM_PREFIX):
        name = spec[len(OLD_RANDOM_PREFIX) :]
        deprecated_spelling(f"{spec!r}", f"{name!r} with --weights random")
        weights = weights or RANDOM
    elif path.suffix in (".pt", ".pth", ".ckpt", ".safetensors"):
        raise FileNotFoundError(f"slide encoder checkpoint {spec} not found")
    entry = None if is_yaml else get_entry(name)  # an unknown name lists the registry
    slidefm_config = entry is None or entry.kind == "slidefm"
    if not weights:
        if not slidefm_config:
            raise ValueError(
                f"slide encoder {name!r} needs --weights hub (HF cache), --weights PATH, or "
                "--weights random"
            )
        deprecated_spelling(f"the bare config name {name!r}", f"{name!r} with --weights random")
        weights = RANDOM
    if weights == RANDOM and slidefm_config:
        return _random_slidefm_encoder(spec, name if entry is None else entry.config, input_dim)
    if entry is None:
        raise ValueError(f"{spec}: a config file takes --weights random only")
    enc = create_slide_encoder(name, weights=weights)
    _check_input_dim(enc, input_dim, name)
    wid = enc.weights_id
    return enc, {
        "slide_encoder": name,
        "slide_encoder_weights": RANDOM if wid == RANDOM else "pretrained",
        "slide_encoder_sha256": wid.rsplit("sha256:", 1)[-1] if "sha256:" in wid else wid,
    }


def _from_checkpoint_file(
    path: Path, spec: str, weights: str | None, input_dim: int | None
) -> tuple[nn.Module, dict[str, str]]:
    from slidefm.models.slide_encoder import SlideEncoder

    if weights not in (None, "", str(spec)):
        raise ValueError(
            f"{spec} is a checkpoint (it records its architecture and weights); give it "
            f"alone, or a registry name with --weights {weights}"
        )
    enc = SlideEncoder.from_checkpoint(path)
    _check_input_dim(enc, input_dim, spec)
    return enc, {
        "slide_encoder": str(path.resolve()),
        "slide_encoder_weights": "pretrained",
        "slide_encoder_sha256": sha256_file(path),
    }


def _random_slidefm_encoder(
    spec: str, config: str, input_dim: int | None
) -> tuple[nn.Module, dict[str, str]]:
    """As before the registry: ``SlideEncoder.from_config``, in train mode (callers switch
    modes themselves), for ``input_dim``-d features: the same numbers for the same seed."""
    from slidefm.models.slide_encoder import SlideEncoder

    log.warning("RANDOM WEIGHTS: the slide encoder %r is untrained (ablation)", spec)
    kw = {"input_dim": int(input_dim)} if input_dim else {}
    enc = SlideEncoder.from_config(config, **kw)
    info = {"slide_encoder": spec, "slide_encoder_weights": RANDOM, "slide_encoder_sha256": RANDOM}
    return enc, info


def _check_input_dim(enc: nn.Module, input_dim: int | None, spec: str) -> None:
    have = getattr(getattr(enc, "config", None), "input_dim", None) or getattr(
        enc, "input_dim", None
    )
    if input_dim is not None and have is not None and int(have) != int(input_dim):
        raise ValueError(
            f"slide encoder {spec} takes {have}-d tile features but these are "
            f"{input_dim}-d; use features from the tile encoder it was pretrained on"
        )
