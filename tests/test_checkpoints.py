"""The one checkpoint layer (``slidefm.io.checkpoints``) and the standardisation module.

Every model slidefm writes is one self-describing format (kind, config, weights,
standardisation provenance, provenance, sha256) read with ``weights_only=True``; files in the
formats written before it (``slidefm.slide_encoder``, ``slidefm.mil``, ``slidefm.align``, the
trainer's raw ``best.pt``; built here exactly as those writers built them) still load and give
the same numbers; anything else is one clear error line.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from slidefm.io.checkpoints import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from slidefm.io.torch_file import CheckpointError
from slidefm.models.mil import ABMIL, Standardized, load_mil_checkpoint, save_mil_checkpoint
from slidefm.models.slide_encoder import SlideEncoder
from slidefm.models.standardize import Standardize

pytestmark = pytest.mark.usefixtures("one_thread")
D = 8


def _bag(seed: int = 0, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(25, generator=g)[:n]
    return 3 + 2 * torch.randn(1, n, D, generator=g), torch.stack([cells % 5, cells // 5], -1)[None]


def _encoder() -> SlideEncoder:
    torch.manual_seed(0)
    enc = SlideEncoder.from_config("tiny", input_dim=D).eval()
    enc.set_input_stats(torch.linspace(2, 4, D), torch.linspace(1, 3, D), {"n_tiles": 99})
    return enc


def _naive_sha256(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(bytes(t.flatten().view(torch.uint8).tolist()))
    return h.hexdigest()


def test_one_self_describing_format_read_with_weights_only(tmp_path):
    enc = _encoder()
    enc.save_checkpoint(tmp_path / "e.pt", {"run": "r1"})
    raw = torch.load(tmp_path / "e.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["kind"] == "slide_encoder" and raw["version"] == 1
    assert raw["config"]["input_dim"] == D and raw["provenance"]["extra"] == {"run": "r1"}
    assert raw["standardization"] == {"input_norm": {"n_tiles": 99}}
    assert raw["sha256"] == _naive_sha256(raw["state_dict"])
    # the state-dict keys are those of before the Standardize module
    assert {"input_mean", "input_std"} <= set(raw["state_dict"])
    assert not any(k.startswith("input_norm.") for k in raw["state_dict"])
    model, meta = load_checkpoint(tmp_path / "e.pt", "slide_encoder")
    x, grid = _bag()
    with torch.no_grad():
        torch.testing.assert_close(model(x, grid), enc(x, grid), atol=0, rtol=0)
    assert model.input_norm.provenance == {"n_tiles": 99} and "state_dict" not in meta


def test_modified_weights_wrong_kind_and_unknown_files_are_one_line_errors(tmp_path):
    _encoder().save_checkpoint(tmp_path / "e.pt")
    raw = torch.load(tmp_path / "e.pt", weights_only=True)
    raw["state_dict"]["input_std"] = raw["state_dict"]["input_std"] * 2
    torch.save(raw, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="do not match the checkpoint's sha256"):
        SlideEncoder.from_checkpoint(tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="not a slidefm MIL checkpoint: it holds a 'slide_en"):
        load_mil_checkpoint(tmp_path / "e.pt")
    torch.save({"format": "someone.else", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a slidefm slide encoder checkpoint \(someone"):
        SlideEncoder.from_checkpoint(tmp_path / "other.pt")
    raw["version"] = 99
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        SlideEncoder.from_checkpoint(tmp_path / "future.pt")
    for p in ("tampered.pt", "other.pt", "future.pt"):
        try:
            SlideEncoder.from_checkpoint(tmp_path / p)
        except CheckpointError as e:
            assert "\n" not in str(e)


# ------------------------------------------------------------------------ formats before this


def test_old_slide_encoder_checkpoint_loads_with_the_same_numbers(tmp_path):
    enc = _encoder()
    sd = {k: v.detach().cpu() for k, v in enc.state_dict().items()}
    import dataclasses

    old = {"format": "slidefm.slide_encoder", "config": dataclasses.asdict(enc.config),
           "state_dict": sd, "slidefm_version": "0.9", "extra": {"run": "old"}}  # fmt: skip
    torch.save(old, tmp_path / "old.pt")
    x, grid = _bag(1)
    again = SlideEncoder.from_checkpoint(tmp_path / "old.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(x, grid), enc(x, grid), atol=0, rtol=0)
    meta = _encoder().load_checkpoint(tmp_path / "old.pt")
    assert meta["extra"] == {"run": "old"} and meta["slidefm_version"] == "0.9"
    assert meta["provenance"]["legacy_format"] == "slidefm.slide_encoder"


def _mil_meta() -> dict:
    return {"model": "abmil", "in_dim": D, "num_classes": 3, "model_kwargs": {"hidden": 16},
            "standardize": True, "seed": 0, "task": {"classes": ["a", "b", "c"]}}  # fmt: skip


def _mil_model() -> Standardized:
    torch.manual_seed(0)
    return Standardized(ABMIL(D, 3, hidden=16), torch.full((D,), 3.0), torch.full((D,), 2.0))


def test_mil_checkpoint_round_trip_and_old_format(tmp_path):
    model, meta = _mil_model().eval(), _mil_meta()
    x, grid = _bag(2)
    with torch.no_grad():
        want = model(x, grid)["logits"]
    save_mil_checkpoint(tmp_path / "new.pt", model, meta)
    torch.save({"format": "slidefm.mil", "meta": meta, "state_dict": model.state_dict()},
               tmp_path / "old.pt")  # fmt: skip  # as save_mil_checkpoint wrote it before
    for name in ("new.pt", "old.pt"):
        again, got_meta = load_mil_checkpoint(tmp_path / name)
        assert got_meta == meta and not again.training
        with torch.no_grad():
            torch.testing.assert_close(again(x, grid)["logits"], want, atol=0, rtol=0)
    again, _ = load_mil_checkpoint(tmp_path / "new.pt")
    assert again.zscore.provenance == {"fitted_on": "training-fold tiles"}


class _Pickled:  # a Python object in a checkpoint: weights_only=True refuses to run its code
    pass


def test_mil_file_holding_python_objects_is_refused_naming_the_old_format(tmp_path):
    meta = {**_mil_meta(), "obj": _Pickled()}
    torch.save({"format": "slidefm.mil", "meta": meta, "state_dict": _mil_model().state_dict()},
               tmp_path / "pickled.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"pickled Python objects.*slidefm\.mil") as e:
        load_mil_checkpoint(tmp_path / "pickled.pt")
    assert "\n" not in str(e.value)


def test_old_alignment_checkpoint_loads_with_the_same_numbers(shared_data, tmp_path):
    import dataclasses

    import pandas as pd

    from slidefm.encoders.text import train_tokenizer
    from slidefm.models.clip import AlignModelConfig, SlideTextModel

    texts = pd.read_csv(shared_data / "reports" / "tcga_reports_val.csv")["text"][:30].tolist()
    tok = train_tokenizer(texts, 400, tmp_path / "tok.model")
    text = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "context_length": 16}
    torch.manual_seed(0)
    model = SlideTextModel(AlignModelConfig(embed_dim=16, text=text), D, tok).eval()
    model.set_slide_stats(torch.randn(20, D) * 3 + 1)
    assert {"slide_mean", "slide_std"} <= set(model.state_dict())
    old = {"format": "slidefm.align", "config": dataclasses.asdict(model.cfg), "slide_dim": D,
           "slide_encoder_config": None, "tokenizer": model.tokenizer.model_bytes,
           "state_dict": model.state_dict(), "extra": {"seed": 3}}  # fmt: skip
    torch.save(old, tmp_path / "old.pt")
    model.save_checkpoint(tmp_path / "new.pt", {"seed": 3})
    emb = torch.randn(4, D)
    with torch.no_grad():
        want = model.encode_slide(embeddings=emb), model.embed_texts(texts[:2])
    for name in ("old.pt", "new.pt"):
        again = SlideTextModel.from_checkpoint(tmp_path / name)
        assert again.checkpoint_extra == {"seed": 3}
        with torch.no_grad():
            torch.testing.assert_close(again.encode_slide(embeddings=emb), want[0], atol=0, rtol=0)
            torch.testing.assert_close(again.embed_texts(texts[:2]), want[1], atol=0, rtol=0)


def test_trainer_best_weights_old_and_new(tmp_path):
    sd = {"w": torch.arange(4.0)}
    torch.save({"model": sd, "metric": "val_loss", "mode": "min", "value": 0.5, "step": 7},
               tmp_path / "old.pt")  # fmt: skip  # the trainer's best.pt before
    save_checkpoint(tmp_path / "new.pt", sd, "train_best", provenance={"step": 7, "value": 0.5})
    for name in ("old.pt", "new.pt"):
        p = read_checkpoint(tmp_path / name, "train_best")
        assert p["provenance"]["step"] == 7 and torch.equal(p["state_dict"]["w"], sd["w"])


# ------------------------------------------------------------------------------ standardisation


def test_standardize_is_the_hand_formula_and_keeps_flat_keys_elsewhere():
    from slidefm.models.pretrain import MaskedFeatureModel

    x = torch.randn(50, D) * torch.linspace(0.5, 4, D) + 7
    s = Standardize(D)
    torch.testing.assert_close(s(x), x)  # identity before fitting
    s.fit(x, {"fitted_on": "x"})
    mean = x.sum(0) / len(x)
    std = ((x - mean) ** 2).sum(0).div(len(x) - 1).sqrt()
    torch.testing.assert_close(s(x), (x - mean) / std)
    assert s.provenance == {"n": 50, "fitted_on": "x"}
    s.set_stats(torch.zeros(D), torch.zeros(D))  # a constant dimension: divided by 1e-6
    assert torch.all(s.std == 1e-6)
    mfm = MaskedFeatureModel(_encoder(), feature_stats=(mean, std))
    keys = set(mfm.state_dict())
    assert {"target_mean", "target_std", "encoder.input_mean"} <= keys
    assert not any("_norm." in k for k in keys)
