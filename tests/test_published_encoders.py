"""Published slide encoders (Prov-GigaPath, TITAN-preview, CHIEF) against their own code.

The references in $SLIDEFM_SHARED_DATA/published_slide_encoders were made by each model's
published implementation (random perturbed weights, float32 and float64; see its README). Every
stored readout and the stored tokens must match within 1e-4 (float32) / 1e-6 (float64). These
tests FAIL, never skip, when the fixtures are missing. Every ``*.pt`` there is checked, so other
fixtures of the same kind are checked the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from slidefm.models import create_slide_encoder, list_slide_encoders
from slidefm.models.registry import PUBLISHED

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TOL = {"float32": 1e-4, "float64": 1e-6}


def _fixture_dir() -> Path:
    env = os.environ.get("SLIDEFM_SHARED_DATA")
    base = Path(env) if env else REPO.parent / "shared" / "data"
    return base / "published_slide_encoders"


def _fixture_files() -> list[str]:
    d = _fixture_dir()
    return sorted(p.name for p in d.glob("*.pt")) if d.is_dir() else ["<missing>"]


_CACHE: dict[str, dict] = {}


def _load(name: str) -> dict:
    d = _fixture_dir()
    if not (d / name).is_file():
        pytest.fail(f"published-encoder fixtures missing: {d / name} (set SLIDEFM_SHARED_DATA)")
    if name not in _CACHE:
        _CACHE[name] = torch.load(d / name, weights_only=False)
    return _CACHE[name]


def _encoder(fx: dict, dtype: str = "float32"):
    enc = create_slide_encoder(fx["model"], weights=fx["state_dict"], **fx["arch"])
    return enc.double() if dtype == "float64" else enc


def _cases() -> list[tuple[str, str]]:
    out = []
    for f in _fixture_files():
        if f == "<missing>":
            out.append((f, ""))
            continue
        out += [(f, c) for c in _load(f)["cases"]]
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("fname", "case"), _cases())
def test_every_stored_readout_matches(fname: str, case: str, dtype: str) -> None:
    fx = _load(fname)
    enc = _encoder(fx, dtype)
    c = fx["cases"][case]
    inp = c["inputs"]
    expected = c["expected"][dtype]
    assert expected, "fixture case without expected outputs"
    feats = inp["features"].to(getattr(torch, dtype))
    for readout, want in expected.items():
        got = enc.embed(feats, inp["coords"], inp["patch_size_level0"], readout=readout)
        assert got.dtype == want.dtype and got.shape == want.shape, readout
        err = float((got - want).abs().max())
        assert err < TOL[dtype], f"{fname} {case} {dtype} {readout}: max |Δ| = {err:.3g}"


def _token_cases() -> list[tuple[str, str, str]]:
    out = []
    for f, c in _cases():
        if f == "<missing>":
            out.append((f, c, "float32"))
            continue
        for dt, o in _load(f)["cases"][c].get("outputs", {}).items():
            if "tokens_out" in o:
                out.append((f, c, dt))
    return out


@pytest.mark.parametrize(("fname", "case", "dtype"), _token_cases())
def test_stored_tokens_match(fname: str, case: str, dtype: str) -> None:
    """Tokens catch what pooled outputs hide (x/y swaps for TITAN, masked padding for GigaPath)."""
    fx = _load(fname)
    enc = _encoder(fx, dtype)
    c = fx["cases"][case]
    inp = c["inputs"]
    feats = inp["features"].to(getattr(torch, dtype))[0]
    with torch.no_grad():
        if fx["model"] == "gigapath":
            tokens = enc.forward_tokens(feats, inp["coords"][0])
        else:
            tokens = enc.forward_tokens(feats, inp["coords"][0], inp["patch_size_level0"])
    want = c["outputs"][dtype]["tokens_out"]
    assert tokens.shape == want.shape
    err = float((tokens - want).abs().max())
    assert err < TOL[dtype], f"{fname} {case} {dtype} tokens_out: max |Δ| = {err:.3g}"


def _published_shapes() -> dict:
    path = _fixture_dir() / "published_shapes.json"
    if not path.is_file():
        pytest.fail(f"{path} missing (set SLIDEFM_SHARED_DATA)")
    return json.loads(path.read_text())


def _state_from_shapes(model: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = _published_shapes()[model]["state_dict_shapes"]
    return {k: 0.02 * torch.randn(*s, generator=g) for k, s in shapes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gigapath", "titan", "chief"])
def test_full_size_published_layout_loads_strictly_and_runs_2000_tiles(model: str) -> None:
    sd = _state_from_shapes(model)
    assert len(sd) == _published_shapes()[model]["n_keys"]
    enc = create_slide_encoder(model, weights=sd)
    n_params = sum(v.numel() for v in enc.state_dict().values())  # CHIEF counts its buffer
    if "n_params" in _published_shapes()[model]:
        assert n_params == _published_shapes()[model]["n_params"]
    entry = PUBLISHED[model]
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 2000, entry.input_dim, generator=g)
    xy = torch.stack(torch.meshgrid(torch.arange(50), torch.arange(40), indexing="ij"), -1)
    coords = (xy.reshape(1, 2000, 2) * (entry.tile_size or 256) + 1000).float()
    z = enc.embed(feats, coords, float(entry.tile_size or 256))
    assert z.shape == (1, entry.output_dim) and bool(torch.isfinite(z).all())


@pytest.mark.parametrize("model", ["gigapath", "titan", "chief"])
def test_missing_or_unexpected_key_is_an_error(model: str) -> None:
    fx = _load(f"{model}.pt")
    sd = dict(fx["state_dict"])
    with pytest.raises(ValueError, match="unexpected keys.*not_a_weight"):
        create_slide_encoder(model, weights={**sd, "not_a_weight": torch.zeros(1)}, **fx["arch"])
    dropped = sorted(sd)[3]
    del sd[dropped]
    with pytest.raises(ValueError, match="missing keys"):
        create_slide_encoder(model, weights=sd, **fx["arch"])
    wrong = dict(fx["state_dict"])
    with pytest.raises(ValueError, match="shape mismatches"):
        create_slide_encoder(model, weights=wrong, **{**fx["arch"], "input_dim": 8})


def test_weight_files_in_the_published_layout(tmp_path: Path) -> None:
    """GigaPath's {"model": …} .pth and a TITAN snapshot folder (with its text tower) load."""
    from safetensors.torch import save_file

    gp = _load("gigapath.pt")
    torch.save({"model": gp["state_dict"]}, tmp_path / "slide_encoder.pth")
    enc = create_slide_encoder("gigapath", weights=tmp_path / "slide_encoder.pth", **gp["arch"])
    assert enc.weights_id.startswith("slide_encoder.pth@sha256:")
    c = gp["cases"][next(iter(gp["cases"]))]
    z = enc.embed(c["inputs"]["features"], c["inputs"]["coords"], 256.0)
    assert float((z - c["expected"]["float32"]["cls"]).abs().max()) < 1e-4

    ti = _load("titan.pt")
    snap = tmp_path / "titan"
    snap.mkdir()
    full = {**ti["state_dict"], "text_encoder.token_embedding.weight": torch.zeros(4, 2)}
    save_file({k: v.contiguous() for k, v in full.items()}, str(snap / "model.safetensors"))
    enc = create_slide_encoder("titan", weights=snap, **ti["arch"])
    c = ti["cases"][next(iter(ti["cases"]))]
    z = enc.embed(c["inputs"]["features"], c["inputs"]["coords"], c["inputs"]["patch_size_level0"])
    assert float((z - c["expected"]["float32"]["slide"]).abs().max()) < 1e-4


def test_hub_offline_fails_fast_and_clearly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match=r"offline \(HF_HUB_OFFLINE=1\).*--weights PATH"):
        create_slide_encoder("gigapath", weights="hub", depth=1, embed_dim=64, num_heads=4)
    with pytest.raises(FileNotFoundError, match="no weights on the Hugging Face hub"):
        create_slide_encoder("chief", weights="hub")
    with pytest.raises(ValueError, match="no published weights"):
        create_slide_encoder("tiny", weights="hub")


def test_registry_lists_published_and_own_encoders() -> None:
    names = list_slide_encoders()
    for n in ("gigapath", "titan", "chief", "titan_like", "gigapath_like", "small", "tiny"):
        assert n in names
    e = PUBLISHED["gigapath"]
    assert (e.input_dim, e.output_dim, e.tile_size, e.tile_encoder) == (1536, 768, 256, "gigapath")
    assert PUBLISHED["titan"].tile_size == 512 and PUBLISHED["titan"].input_dim == 768
    assert PUBLISHED["titan"].accepts_tile_encoder("conch_v1_5") is True
    assert PUBLISHED["titan"].accepts_tile_encoder("uni") is False
    assert PUBLISHED["titan"].accepts_tile_encoder(None) is None
    with pytest.raises(ValueError, match="unknown slide encoder"):
        create_slide_encoder("nope")
    with pytest.raises(ValueError, match="no option"):
        create_slide_encoder("chief", depth=3)


def test_torchscale_padding_is_attended_masked_is_default() -> None:
    """Independent check of the two padding modes on one branch (w=4, r=1, N=6): torchscale's
    second segment holds 2 real keys + 2 zero keys, which enter its softmax with score 0."""
    from slidefm.models.dilated import DilatedAttention

    def dilated_attention(q, k, v, segs, dils, padding="masked"):  # [B, N, H, Dh] layout
        mod = DilatedAttention(segs, dils, "naive", padding)
        return mod(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 1, 3, generator=g, dtype=torch.float64) for _ in range(3))

    def ref(pad_keys: int) -> torch.Tensor:
        outs = []
        for s in (slice(0, 4), slice(4, 6)):
            kk = torch.cat([k[0, s, 0], torch.zeros(4 - k[0, s].shape[0], 3, dtype=k.dtype)])
            vv = torch.cat([v[0, s, 0], torch.zeros(4 - v[0, s].shape[0], 3, dtype=v.dtype)])
            n_real = k[0, s].shape[0]
            kk, vv = (kk, vv) if pad_keys else (kk[:n_real], vv[:n_real])
            w = torch.softmax(q[0, s, 0] @ kk.T / 3**0.5, dim=-1)
            outs.append(w @ vv)
        return torch.cat(outs)

    ts = dilated_attention(q, k, v, [4], [1], padding="torchscale")[0, :, 0]
    masked = dilated_attention(q, k, v, [4], [1])[0, :, 0]
    assert torch.allclose(ts, ref(1), atol=1e-12)
    assert torch.allclose(masked, ref(0), atol=1e-12)
    assert not torch.allclose(ts, masked)


def _write_slide(path: Path, n: int, dim: int, encoder: str, seed: int = 0) -> None:
    import numpy as np

    from slidefm.io.features import SlideFeatures, write_features

    rng = np.random.default_rng(seed)
    cells = rng.choice(40 * 40, size=n, replace=False)
    grid = np.stack([cells % 40, cells // 40], axis=1).astype(np.int32)
    sf = SlideFeatures(
        slide_id=path.stem,
        features=rng.normal(size=(n, dim)).astype(np.float32),
        coords=grid.astype(np.int64) * 256 + 5000,
        grid=grid,
        tissue_fraction=np.ones(n, np.float32),
        attrs=dict(
            encoder=encoder,
            encoder_weights="test",
            target_mpp=0.5,
            patch_size=256,
            patch_size_level0=256,
            config_hash="test",
            seed=seed,
        ),
    )
    write_features(path, sf)


def test_embed_slides_with_a_published_model_and_refusals(tmp_path: Path, capsys) -> None:
    from slidefm.cli import main
    from slidefm.io.embeddings import read_embeddings
    from slidefm.io.features import read_features

    feats = tmp_path / "feats"
    feats.mkdir()
    _write_slide(feats / "s0.h5", 120, 768, "ctranspath", seed=0)
    _write_slide(feats / "s1.h5", 80, 768, "ctranspath", seed=1)
    sd = _state_from_shapes("chief")
    torch.save(sd, tmp_path / "CHIEF_pretraining.pth")
    out = tmp_path / "emb.h5"
    args = [
        "embed-slides",
        "--model",
        "chief",
        "--weights",
        str(tmp_path / "CHIEF_pretraining.pth"),
    ]
    assert main([*args, "--features", str(feats), "--out", str(out)]) == 0
    ids, emb, attrs = read_embeddings(out)
    assert list(ids) == ["s0", "s1"] and emb.shape == (2, 768)
    assert attrs["slide_encoder"] == "chief" and len(attrs["checkpoint_sha256"]) == 64
    enc = create_slide_encoder("chief", weights=sd)
    sf = read_features(feats / "s1.h5")
    want = enc.embed(torch.from_numpy(sf.features)[None], torch.from_numpy(sf.coords)[None], 256.0)
    assert float((torch.from_numpy(emb[1]) - want[0]).abs().max()) < 1e-5

    bad = tmp_path / "bad"
    bad.mkdir()
    _write_slide(bad / "u.h5", 30, 768, "uni")
    assert (
        main(
            [
                "embed-slides",
                "--model",
                "titan",
                "--weights",
                "random",
                "--features",
                str(bad),
                "--out",
                str(tmp_path / "x.h5"),
            ]
        )
        == 2
    )
    assert "tile encoder 'uni'" in capsys.readouterr().err
    bad2 = tmp_path / "bad2"
    bad2.mkdir()
    _write_slide(bad2 / "g.h5", 30, 768, "gigapath")
    assert (
        main(
            [
                "embed-slides",
                "--model",
                "gigapath",
                "--weights",
                "random",
                "--features",
                str(bad2),
                "--out",
                str(tmp_path / "y.h5"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "768-d" in err and "expects 1536-d gigapath" in err
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_embed_slides_model_accepts_slidefm_configs(tmp_path: Path) -> None:
    from bag_utils import write_random_bags

    from slidefm.cli import main
    from slidefm.io.embeddings import read_embeddings

    feats = tmp_path / "feats"
    feats.mkdir()
    write_random_bags(feats, num=2, dim=64)
    out = tmp_path / "e.h5"
    cmd = ["embed-slides", "--model", "tiny", "--weights", "random"]
    assert main([*cmd, "--features", str(feats), "--out", str(out)]) == 0
    ids, emb, attrs = read_embeddings(out)
    assert emb.shape == (2, 64) and attrs["weights"] == "random"
