"""Tile-encoder registry: name → architecture, transforms, pooling and weight source.

In the spirit of timm's ``create_model``: each entry is one small :class:`TileEncoderSpec`
that says how to build the ViT with timm (architecture name + kwargs as published on the model
card), what its input looks like (size, resize, mean/std) and how its tokens become one vector.
Weights come from exactly one place, chosen by the user: ``"random"`` (tests and smoke runs,
recorded as ``"random"``), a local checkpoint file, or the Hugging Face hub/cache (``"hub"``).
A checkpoint that cannot be found is an error, never a silent random model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch/timm load inside the functions that build models: `--help` stays fast
    import torch
    from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0's own normalisation (bioptimus/H-optimus-0 model card).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

POOLINGS = ("cls", "cls+mean", "mean")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class TileEncoderSpec:
    """Everything needed to build one tile encoder and feed it tiles.

    ``resize_size``/``input_size``: tiles (any size) are resized to ``resize_size`` px (square)
    with ``interpolation`` and antialiasing, then centre-cropped to ``input_size`` when smaller.
    ``embed_dim`` is the dimension after pooling (e.g. Virchow2's CLS ⊕ mean = 2 × 1280).
    """

    name: str
    arch: str  # timm architecture name
    timm_kwargs: dict[str, Any]
    embed_dim: int
    input_size: int
    family: str
    hub_id: str | None = None  # "hf-hub:<org>/<repo>"; None = no published weights
    pooling: str = "cls"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None  # None → input_size (no crop)
    interpolation: str = "bicubic"
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    checkpoint_format: str = "timm"  # "timm" or "hf_dinov2" (transformers Dinov2Model keys)
    licence: str = ""
    notes: str = ""
    dev_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.name}: pooling {self.pooling!r} not in {POOLINGS}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"{self.name}: interpolation must be bilinear or bicubic")

    @property
    def resize(self) -> int:
        return self.resize_size or self.input_size


_REGISTRY: dict[str, TileEncoderSpec] = {}


def register(spec: TileEncoderSpec) -> TileEncoderSpec:
    """Add ``spec`` to the registry (one call per entry; names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"tile encoder {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders(include_dev: bool = True) -> list[str]:
    """Registered names in registration order."""
    return [n for n, s in _REGISTRY.items() if include_dev or not s.dev_only]


def get_spec(name: str) -> TileEncoderSpec:
    """The spec called ``name``; a ValueError listing every name otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown tile encoder {name!r}. Available: {', '.join(_REGISTRY)} "
            "(see `slidefm encoders list`)."
        ) from None


# -- entries ---------------------------------------------------------------------------------
# DINOv2 (timm ports of facebookresearch/dinov2, LVD-142M). timm defaults to img_size 518; tiles
# are fed at 224, and the 37×37 position embedding is resampled to 16×16 on load.
_DINOV2 = {
    "s": ("small", 384),
    "b": ("base", 768),
    "l": ("large", 1024),
    "g": ("giant", 1536),
}
for _k, (_size, _dim) in _DINOV2.items():
    for _reg in (False, True):
        _arch = f"vit_{_size}_patch14_{'reg4_' if _reg else ''}dinov2"
        register(
            TileEncoderSpec(
                name=f"dinov2_vit{_k}14{'_reg' if _reg else ''}",
                arch=_arch,
                timm_kwargs={"img_size": 224, "num_classes": 0},
                embed_dim=_dim,
                input_size=224,
                family="DINOv2 (natural images)",
                hub_id=f"hf-hub:timm/{_arch}.lvd142m",
                licence="Apache-2.0",
                notes="general-purpose baseline; CLS token",
            )
        )

register(
    TileEncoderSpec(
        name="uni",
        arch="vit_large_patch16_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        embed_dim=1024,
        input_size=224,
        family="UNI (Mahmood Lab)",
        hub_id="hf-hub:MahmoodLab/UNI",
        licence="CC-BY-NC-ND-4.0, gated (HF token + accepted terms)",
        notes="ViT-L/16, DINOv2-trained on Mass-100K",
    )
)

register(
    TileEncoderSpec(
        name="uni2_h",
        arch="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        embed_dim=1536,
        input_size=224,
        family="UNI (Mahmood Lab)",
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        licence="CC-BY-NC-ND-4.0, gated (HF token + accepted terms)",
        notes="ViT-H/14, 8 register tokens, SwiGLU; CLS token",
    )
)

register(
    TileEncoderSpec(
        name="phikon_v2",
        arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0},
        embed_dim=1024,
        input_size=224,
        family="Phikon (Owkin)",
        hub_id="hf-hub:owkin/phikon-v2",
        checkpoint_format="hf_dinov2",
        licence="Owkin non-commercial licence",
        notes="ViT-L/16 DINOv2; HF transformers checkpoint, keys mapped to timm on load",
    )
)

register(
    TileEncoderSpec(
        name="virchow2",
        arch="vit_huge_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
        },
        embed_dim=2 * 1280,
        input_size=224,
        pooling="cls+mean",
        family="Virchow (Paige)",
        hub_id="hf-hub:paige-ai/Virchow2",
        licence="CC-BY-NC-ND-4.0, gated (HF token + accepted terms)",
        notes="ViT-H/14 reg4 SwiGLU; CLS ⊕ mean of patch tokens (registers excluded)",
    )
)

register(
    TileEncoderSpec(
        name="h_optimus_0",
        arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0},
        embed_dim=1536,
        input_size=224,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        family="H-optimus (Bioptimus)",
        hub_id="hf-hub:bioptimus/H-optimus-0",
        licence="Apache-2.0, gated (HF token + accepted terms)",
        notes="ViT-g/14 reg4 (1.1B); own mean/std; CLS token",
    )
)

register(
    TileEncoderSpec(
        name="gigapath",
        arch="vit_giant_patch14_dinov2",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        embed_dim=1536,
        input_size=224,
        resize_size=256,
        family="Prov-GigaPath (Microsoft/Providence)",
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        licence="Prov-GigaPath licence (research use), gated (HF token + accepted terms)",
        notes="ViT-g/16 (1.1B) tile encoder; resize 256 bicubic + centre crop 224 as in its demo",
    )
)

register(
    TileEncoderSpec(
        name="vit_tiny_dev",
        arch="vit_tiny_patch16_224",
        timm_kwargs={"img_size": 112, "depth": 4, "num_classes": 0},
        embed_dim=192,
        input_size=112,
        interpolation="bilinear",
        family="dev",
        hub_id=None,
        dev_only=True,
        licence="-",
        notes="DEV ONLY: tiny random ViT for tests, demos, synthetic experiments; no weights",
    )
)


# -- building --------------------------------------------------------------------------------
_LAYERS = {
    "swiglu_packed": ("timm.layers", "SwiGLUPacked"),
    "silu": ("torch.nn", "SiLU"),
    "gelu": ("torch.nn", "GELU"),
}


def _timm_kwargs(spec: TileEncoderSpec) -> dict[str, Any]:
    """Spec kwargs with layer names turned into classes (specs stay printable/hashable)."""
    import importlib

    kw = dict(spec.timm_kwargs)
    for key in ("mlp_layer", "act_layer"):
        if isinstance(kw.get(key), str):
            module, attr = _LAYERS[kw[key]]
            kw[key] = getattr(importlib.import_module(module), attr)
    kw.setdefault("num_classes", 0)
    return kw


def build_model(spec: TileEncoderSpec) -> nn.Module:
    """The timm ViT of ``spec`` with timm's init (use ``with torch.device("meta")`` for shapes).

    For ``--weights random`` use :func:`build_random_model`: timm's init is a training start,
    not a usable random feature extractor.
    """
    import timm

    return timm.create_model(spec.arch, pretrained=False, **_timm_kwargs(spec))


RANDOM_LAYERSCALE = 1.0  # LayerScale gamma of a random-weight model (timm starts DINOv2 at 1e-5)


def make_random_input_dependent(model: nn.Module) -> nn.Module:
    """Set every LayerScale gamma to ``RANDOM_LAYERSCALE`` (in place); returns ``model``.

    Why: DINOv2-style ViTs (timm ``init_values=1e-5``) scale each residual branch by 1e-5 at
    init, so an untrained model is a near-identity on the tokens and its CLS token never sees the
    image: every tile gets the same feature (cosine 0.999999 between a black and a white tile).
    With gamma = 1 the random blocks mix the patch tokens into the CLS token, as in a plain ViT.
    """
    import torch
    from timm.layers import LayerScale

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(RANDOM_LAYERSCALE)
    return model


def build_random_model(spec: TileEncoderSpec) -> nn.Module:
    """The timm ViT of ``spec`` with random weights whose outputs depend on the input."""
    return make_random_input_dependent(build_model(spec))


# -- weights ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights come from: ``path=None`` means random init."""

    path: Path | None
    weights_id: str  # "random" or "<name>@sha256:<hex>"

    @property
    def is_random(self) -> bool:
        return self.path is None


def sha256_file(path: str | Path, chunk: int = 1 << 23) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a checkpoint; Hugging Face cache blobs are named by it (verified on download)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    return sha256_file(real)


def _hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (``HF_ENDPOINT``), at most ``timeout_s`` seconds.

    Without it, huggingface_hub retries each file for ~30 s with backoff when there is no
    network. Behind a proxy (``HTTPS_PROXY``/``ALL_PROXY``) a direct connect proves nothing, so
    the hub is assumed reachable and huggingface_hub decides.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_not_found_message(spec: TileEncoderSpec, reason: str, offline: str = "") -> str:
    repo = spec.hub_id.removeprefix("hf-hub:") if spec.hub_id else "?"
    return (
        f"Weights for tile encoder {spec.name!r} ({spec.hub_id}) are not available"
        f"{f' offline ({offline})' if offline else ''}: {reason}\n"
        "Fix one of:\n"
        f"  * pass a local checkpoint: --weights /path/to/{spec.hub_files[-1]}\n"
        f"  * fill the Hugging Face cache on a machine with internet: "
        f"huggingface-cli download {repo} (then copy $HF_HOME)\n"
        "  * gated models need an HF token whose account accepted the model's terms "
        "(huggingface-cli login or HF_TOKEN)\n"
        "  * for a smoke test only: --weights random (outputs are then marked random)"
    )


def _download_hub(spec: TileEncoderSpec) -> Path:
    """First of ``spec.hub_files`` found in the HF cache (or downloaded when online)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if spec.hub_id is None:
        raise ValueError(
            f"Tile encoder {spec.name!r} has no published weights; use --weights random "
            "or --weights PATH."
        )
    repo = spec.hub_id.removeprefix("hf-hub:")
    if _hub_offline_env():
        offline = "HF_HUB_OFFLINE=1"
    elif not hub_reachable():
        offline = "no network: the hub endpoint is unreachable, only the local cache was read"
    else:
        offline = ""
    errors = []
    for filename in spec.hub_files:
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=bool(offline)))
        except (LocalEntryNotFoundError, EntryNotFoundError) as e:
            errors.append(f"{filename}: {type(e).__name__}")
        except (HfHubHTTPError, OSError) as e:  # gated/401/403, network
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0]}")
    raise FileNotFoundError(_hub_not_found_message(spec, "; ".join(errors), offline))


def resolve_weights(spec: TileEncoderSpec, weights: str | Path = "hub") -> ResolvedWeights:
    """Turn the user's ``--weights`` value into a file (or random) and its recorded id.

    ``"random"`` → random init; ``"hub"`` → ``spec.hub_id`` via the HF cache (honours
    ``HF_HUB_OFFLINE``); anything else is a local checkpoint path that must exist.
    """
    w = str(weights)
    if w == "random":
        return ResolvedWeights(None, "random")
    if w == "hub":
        path = _download_hub(spec)
        return ResolvedWeights(path, f"{spec.hub_id}@sha256:{_file_sha256(path)}")
    path = Path(w).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {str(path)!r} for tile encoder {spec.name!r} does not exist. "
            "Pass an existing .pth/.bin/.safetensors file, --weights hub (HF cache), or "
            "--weights random for a smoke test."
        )
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: checkpoint must end in one of {CHECKPOINT_SUFFIXES}")
    return ResolvedWeights(path, f"{path.name}@sha256:{_file_sha256(path)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors or torch pickle, loaded weights-only)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:  # mmap keeps a multi-GB checkpoint out of RAM until its tensors are used
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be mmapped (or a corrupt file)
        from slidefm.io.torch_file import load_torch_file

        sd = load_torch_file(path, "tile-encoder weights", map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP ``module.``, Lightning ``model.``, …) shared by every key."""
    changed = True
    while changed and sd:
        changed = False
        for p in _STRIP_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_hf_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``Dinov2Model`` keys (e.g. owkin/phikon-v2) → timm VisionTransformer keys.

    q, k, v projections are concatenated in that order into timm's fused ``qkv``.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block_map = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "embeddings.mask_token":
            continue
        if k in simple:
            out[simple[k]] = v
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", k)
        if m is None:
            out[k] = v  # left for the strict load to report
            continue
        i, name, kind = int(m[1]), m[2], m[3]
        if name in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{i}.ls{name[-1]}.gamma"] = v
        elif name.startswith("attention.attention."):
            qkv.setdefault((i, kind), {})[name.rsplit(".", 1)[1]] = v
        elif name in block_map:
            out[f"blocks.{i}.{block_map[name]}.{kind}"] = v
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {i}: incomplete q/k/v {kind} in HF Dinov2 checkpoint")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    return out


def _adapt_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Known, lossless conversions only: key renames and position-embedding grid resampling."""
    from timm.layers import resample_abs_pos_embed

    sd = strip_prefixes(dict(sd))
    if "embeddings.patch_embeddings.projection.weight" in sd:
        sd = convert_hf_dinov2(sd)
    if "mask_token" in sd:  # original facebookresearch/dinov2 layout
        from timm.models.vision_transformer import _convert_dinov2

        sd = _convert_dinov2(sd, model)
    pe = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is not None and target is not None and pe.shape != target.shape and pe.ndim == 3:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old = pe.shape[1] - n_prefix
        side = int(round(old**0.5))
        if side * side == old and pe.shape[2] == target.shape[2]:
            log.info("resampling pos_embed %s → grid %s", side, model.patch_embed.grid_size)
            sd["pos_embed"] = resample_abs_pos_embed(
                pe.float(),
                new_size=list(model.patch_embed.grid_size),
                old_size=[side, side],
                num_prefix_tokens=n_prefix,
            )
    return sd


def state_dict_mismatch(own: dict[str, Any], sd: dict[str, Any]) -> str:
    """Lines listing missing keys, unexpected keys and shape mismatches ("" when they match)."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]

    def show(xs: list[str]) -> str:
        return ", ".join(xs[:12]) + (f" … (+{len(xs) - 12})" if len(xs) > 12 else "")

    return (
        (f"\n  missing keys ({len(missing)}): {show(missing)}" if missing else "")
        + (f"\n  unexpected keys ({len(unexpected)}): {show(unexpected)}" if unexpected else "")
        + (f"\n  shape mismatches ({len(shapes)}): {show(shapes)}" if shapes else "")
    )


def load_weights(model: nn.Module, path: str | Path, name: str = "") -> nn.Module:
    """Strictly load a checkpoint into ``model``; a ValueError lists every key that disagrees.

    Works on a ``meta``-device model (the tensors are assigned, nothing is initialised twice).
    """
    sd = _adapt_state_dict(read_state_dict(path), model)
    own = model.state_dict()
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise ValueError(
            f"Checkpoint {path} does not match tile encoder {name!r}:{problems}"
            "\nIs this the right checkpoint for this encoder (see `slidefm encoders list`)?"
        )
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model
