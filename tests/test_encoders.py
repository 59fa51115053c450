"""Tile encoders: every registry entry's architecture, weights resolution, preprocessing, pooling.

Big models (up to 1.1B parameters) are only built on the ``meta`` device: shapes and parameter
counts are checked without allocating memory. References are independent of our code: the
published parameter counts and token counts, PIL resizing + hand-written normalisation, timm's
own forward, hashlib, and q/k/v split by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from slidefm.encoders.registry import (
    build_model,
    convert_hf_dinov2,
    get_spec,
    list_encoders,
    resolve_weights,
)
from slidefm.encoders.tile import PooledViT, TileEncoder, pool_tokens, preprocess_tiles
from slidefm.pipelines.encoders_cmd import format_table, registry_rows

REPO = Path(__file__).resolve().parent.parent

# Parameter counts published by the model authors (millions) and the documented output dims.
# "1.1B"-style figures are rounded to ±50M, hence the 5% tolerance on those.
PUBLISHED = {
    "dinov2_vits14": (21, 384),
    "dinov2_vitb14": (86, 768),
    "dinov2_vitl14": (300, 1024),
    "dinov2_vitg14": (1100, 1536),
    "uni": (303.4, 1024),  # ViT-L/16
    "uni2_h": (681, 1536),  # UNI2-h model card: 681M
    "phikon_v2": (303.4, 1024),
    "virchow2": (631.2, 2560),  # ViT-H/14 632M; CLS ⊕ mean = 2 × 1280
    "h_optimus_0": (1100, 1536),  # "1.1B"
    "gigapath": (1130, 1536),  # "1.13B"
}


def _meta_forward(name: str) -> tuple[torch.Size, float, PooledViT]:
    spec = get_spec(name)
    with torch.device("meta"):
        model = PooledViT(build_model(spec), spec.pooling)
        out = model(torch.empty(2, 3, spec.input_size, spec.input_size))
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return out.shape, n_params, model


@pytest.mark.parametrize("name", list_encoders())
def test_every_entry_builds_offline_with_documented_output_dim(name):
    shape, n_params, model = _meta_forward(name)
    spec = get_spec(name)
    assert shape == (2, spec.embed_dim)
    assert all(p.is_meta for p in model.parameters())
    base = name.removesuffix("_reg")
    if base in PUBLISHED:
        published_m, dim = PUBLISHED[base]
        assert spec.embed_dim == dim
        tol = 0.05 if published_m >= 1000 else 0.03
        assert abs(n_params - published_m) / published_m < tol, n_params


def test_gigapath_token_count_matches_its_reference_output():
    """The shipped GigaPath output is a view into a (197, 1536) token buffer: 1 CLS + 14×14."""
    _, _, model = _meta_forward("gigapath")
    assert model.trunk.pos_embed.shape[1] == 197
    assert model.trunk.num_prefix_tokens == 1


def test_register_token_counts():
    assert _meta_forward("uni2_h")[2].trunk.num_prefix_tokens == 1 + 8
    assert _meta_forward("virchow2")[2].trunk.num_prefix_tokens == 1 + 4
    assert _meta_forward("h_optimus_0")[2].trunk.num_prefix_tokens == 1 + 4
    assert _meta_forward("dinov2_vits14_reg")[2].trunk.num_prefix_tokens == 1 + 4


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="Available: .*uni2_h.*virchow2"):
        get_spec("uni3")


# -- real CPU forwards -----------------------------------------------------------------------
def _tiles(n: int = 3, size: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["vit_tiny_dev", "dinov2_vits14"])
def test_real_forward_matches_timm_head(name):
    torch.manual_seed(0)
    enc = TileEncoder.create(name, weights="random", device="cpu")
    assert enc.is_random and enc.weights_id == "random"
    assert not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    tiles = _tiles()
    out = enc(tiles)
    assert out.shape == (3, enc.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # timm's own classifier-free head (global_pool="token") is the CLS reference.
    with torch.inference_mode():
        ref = enc.model.trunk(enc.preprocess(tiles))
    torch.testing.assert_close(out, ref)
    # Tiles are embedded independently of their batch neighbours.
    torch.testing.assert_close(enc(tiles[1:2]), out[1:2], rtol=1e-4, atol=1e-5)


def test_cls_plus_mean_pooling_excludes_registers():
    """Virchow2 recipe: tokens[:, 0] ⊕ tokens[:, 5:].mean(1) for a reg4 ViT (its model card)."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4, num_classes=0, global_pool=""
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit(x)  # global_pool="" → all tokens (B, 1 + 4 + 16, C)
        got = PooledViT(vit, "cls+mean")(x)
    ref = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(got, ref)
    mean_only = pool_tokens(tokens, "mean", 5)
    torch.testing.assert_close(mean_only, tokens[:, 5:].sum(1) / 16)


# -- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    enc = TileEncoder.create("vit_tiny_dev", weights="random", device="cpu")
    d = tmp_path_factory.mktemp("ckpt")
    sd = enc.model.trunk.state_dict()
    pth = d / "tiny.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, pth)  # DDP-style prefix
    st = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    return enc, sd, pth, st


def test_checkpoint_round_trip_is_exact(tiny_checkpoint):
    enc, _, pth, st = tiny_checkpoint
    tiles = _tiles(4, 256, seed=3)
    want = enc(tiles)
    for path in (pth, st):
        loaded = TileEncoder.create("vit_tiny_dev", weights=str(path), device="cpu")
        assert not loaded.is_random
        assert torch.equal(loaded(tiles), want)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert loaded.weights_id == f"{path.name}@sha256:{digest}"


def test_wrong_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    _, sd, _, _ = tiny_checkpoint
    bad = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}
    bad["head.extra.weight"] = torch.zeros(2)
    bad["pos_embed"] = torch.zeros(1, 50, 7)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as e:
        TileEncoder.create("vit_tiny_dev", weights=str(path), device="cpu")
    msg = str(e.value)
    assert "missing keys" in msg and "blocks.3.attn.qkv.weight" in msg
    assert "unexpected keys" in msg and "head.extra.weight" in msg
    assert "shape mismatches" in msg and "pos_embed" in msg


def test_checkpoint_for_another_architecture_fails(tmp_path):
    """A ViT-S checkpoint must not load into the tiny ViT (no silent partial load)."""
    with torch.device("meta"):
        other = build_model(get_spec("vit_tiny_dev"))
    sd = {k: torch.zeros(v.shape[:-1] + (v.shape[-1] * 2,)) for k, v in other.state_dict().items()}
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        TileEncoder.create("vit_tiny_dev", weights=str(path), device="cpu")


def test_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights random"):
        resolve_weights(get_spec("uni"), tmp_path / "nope.bin")
    with pytest.raises(ValueError, match="no published weights"):
        resolve_weights(get_spec("vit_tiny_dev"), "hub")


def test_hf_dinov2_keys_are_mapped(tiny_checkpoint, tmp_path):
    """Phikon-v2 ships transformers Dinov2Model keys; q/k/v are split here by hand."""
    enc, sd, _, _ = tiny_checkpoint
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, 192),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(4):
        b, p = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3)
            hf[p + f"attention.attention.query.{kind}"] = q
            hf[p + f"attention.attention.key.{kind}"] = k
            hf[p + f"attention.attention.value.{kind}"] = v
            hf[p + f"attention.output.dense.{kind}"] = sd[b + f"attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[p + f"{n}.{kind}"] = sd[b + f"{n}.{kind}"]
    # vit_tiny_dev has no LayerScale; check the gamma names on a synthetic layer instead.
    conv = convert_hf_dinov2({"encoder.layer.7.layer_scale2.lambda1": torch.ones(3)})
    assert list(conv) == ["blocks.7.ls2.gamma"]
    path = tmp_path / "hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    loaded = TileEncoder.create("vit_tiny_dev", weights=str(path), device="cpu")
    tiles = _tiles(2, 112, seed=5)
    assert torch.equal(loaded(tiles), enc(tiles))


def test_dinov2_518_position_embedding_is_resampled(tmp_path):
    """timm's DINOv2 weights are for 518 px (37×37 grid); tiles run at 224 (16×16)."""
    spec = get_spec("dinov2_vits14")
    big = timm.create_model(spec.arch, pretrained=False, num_classes=0)  # img_size 518
    assert big.pos_embed.shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(path))
    enc = TileEncoder.create("dinov2_vits14", weights=str(path), device="cpu")
    assert enc.model.trunk.pos_embed.shape == (1, 1 + 16 * 16, 384)
    torch.testing.assert_close(enc.model.trunk.cls_token, big.cls_token)
    # The CLS position embedding is kept, the grid part is interpolated.
    torch.testing.assert_close(enc.model.trunk.pos_embed[:, 0], big.pos_embed[:, 0])


# -- Hugging Face hub / cache (subprocess: huggingface_hub reads HF_* at import) ------------------
def _run_isolated(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hub_offline_without_cache_is_a_clear_error(tmp_path):
    r = _run_isolated(
        """
        from slidefm.encoders.tile import TileEncoder
        try:
            TileEncoder.create("uni", weights="hub", device="cpu")
        except FileNotFoundError as e:
            print("ERR", e)
        else:
            print("LOADED")
        """,
        tmp_path / "hf",
    )
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "LOADED" not in r.stdout
    for hint in ("HF_HUB_OFFLINE=1", "--weights /path/to/", "huggingface-cli download", "token"):
        assert hint in r.stdout, r.stdout
    assert "--weights random" in r.stdout


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_without_network_fails_fast_and_once(tmp_path):
    """No HF_HUB_OFFLINE and no network: one quick connectivity check, then the local cache only
    (huggingface_hub alone retries each file for ~30 s and prints every retry)."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
    }
    for k in (
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HTTPS_PROXY",
        "https_proxy",
    ):
        env.pop(k, None)
    code = """
        import time
        from slidefm.encoders.registry import get_spec, resolve_weights
        t0 = time.perf_counter()
        try:
            resolve_weights(get_spec("dinov2_vits14"), "hub")
        except FileNotFoundError as e:
            print("ERR", e)
        print("SECONDS", time.perf_counter() - t0)
        """
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "no network" in r.stdout, r.stdout
    assert float(r.stdout.split("SECONDS")[1]) < 10, r.stdout
    assert "Retrying" not in r.stderr, r.stderr  # huggingface_hub's retry loop never ran


def test_hub_offline_with_populated_cache_loads(tiny_checkpoint, tmp_path):
    """An HF cache laid out as huggingface_hub writes it (blob named by sha256) loads offline."""
    _, sd, _, _ = tiny_checkpoint
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    digest = hashlib.sha256(st.read_bytes()).hexdigest()
    repo = tmp_path / "hf" / "hub" / "models--test-org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    os.replace(st, repo / "blobs" / digest)
    (snap / "model.safetensors").symlink_to(repo / "blobs" / digest)
    (repo / "refs" / "main").write_text("a" * 40)
    r = _run_isolated(
        """
        import dataclasses, torch
        from slidefm.encoders.registry import get_spec, resolve_weights, build_model, load_weights
        spec = dataclasses.replace(get_spec("vit_tiny_dev"), hub_id="hf-hub:test-org/tiny")
        w = resolve_weights(spec, "hub")
        print("ID", w.weights_id)
        m = load_weights(build_model(spec), w.path, spec.name)
        print("SUM", float(m.pos_embed.double().sum()))
        """,
        tmp_path / "hf",
    )
    assert r.returncode == 0, r.stderr
    assert f"ID hf-hub:test-org/tiny@sha256:{digest}" in r.stdout
    assert f"SUM {float(sd['pos_embed'].double().sum())}" in r.stdout


# -- preprocessing ---------------------------------------------------------------------------
def _pil_reference(img: Image.Image, spec, resample) -> np.ndarray:
    """Independent reference: PIL resize, PIL crop, manual normalisation → (3, S, S)."""
    r, s = spec.resize, spec.input_size
    im = img.resize((r, r), resample)
    top = int(round((r - s) / 2))
    im = im.crop((top, top, top + s, top + s))
    a = np.asarray(im, dtype=np.float32) / 255.0
    return ((a - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "name,resample,max_tol",
    [
        ("gigapath", Image.BICUBIC, 0.15),  # 128 → 256 bicubic, centre crop 224
        ("h_optimus_0", Image.BICUBIC, 0.15),  # own mean/std
        ("vit_tiny_dev", Image.BILINEAR, 0.03),  # 128 → 112 bilinear, antialiased
    ],
)
def test_preprocess_matches_pil_reference(shared_data, name, resample, max_tol):
    img = Image.open(shared_data / "embeddings/gigapath_tile/prov_normal_000_1.png").convert("RGB")
    spec = get_spec(name)
    tiles = torch.from_numpy(np.array(img))[None]  # (1, 128, 128, 3) uint8
    got = preprocess_tiles(tiles, spec)[0].numpy()
    ref = _pil_reference(img, spec, resample)
    assert got.shape == ref.shape == (3, spec.input_size, spec.input_size)
    diff = np.abs(got - ref)
    # PIL rounds to uint8 (≤ 0.5/255/std ≈ 0.009) and uses a different bicubic kernel (a=-0.5
    # vs torch's -0.75): small mean error, bounded max error at sharp edges.
    assert diff.mean() < 0.01, diff.mean()
    assert diff.max() < max_tol, diff.max()


def test_preprocess_no_resize_is_plain_normalisation():
    spec = get_spec("vit_tiny_dev")
    tiles = _tiles(2, 112)
    got = preprocess_tiles(tiles, spec)
    a = tiles.numpy().astype(np.float64) / 255.0
    ref = ((a - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_preprocess_rejects_wrong_layout():
    spec = get_spec("vit_tiny_dev")
    with pytest.raises(ValueError, match="uint8"):
        preprocess_tiles(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), spec)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_tiles(torch.zeros(2, 64, 64, 3), spec)


# -- CLI -------------------------------------------------------------------------------------
def test_encoders_list_cli(capsys):
    from slidefm.cli import main

    assert main(["encoders", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_encoders():
        assert name in out
    assert "hf-hub:paige-ai/Virchow2" in out and "2560" in out and "cls+mean" in out
    rows = registry_rows()
    table = format_table(rows)
    assert len(table.splitlines()) == 2 + len(list_encoders())
    assert dataclasses.is_dataclass(get_spec("uni"))
