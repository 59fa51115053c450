"""Bad inputs end in one line of error naming the file, never a traceback (issue 17): config
and prompt YAML that does not parse, config sections of the wrong shape, truncated ``.pt``
files, unwritable output paths; ``heatmap --slide`` of another slide; the tokenizer's real
vocabulary bounds."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from bag_utils import write_random_bags

from slidefm.cli import main
from slidefm.config import ConfigError
from slidefm.eval.zero_shot import load_prompts
from slidefm.io.features import SlideFeatures, grid_from_coords, write_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def test_config_that_is_not_yaml(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  max_steps: [1, 2\n  lr: : 3\n")
    feats = tmp_path / "f"
    write_random_bags(feats, num=2, dim=8)
    argv = [
        "pretrain",
        "--config",
        str(cfg),
        "--features",
        str(feats),
        "--out",
        str(tmp_path / "o"),
    ]
    msg = _one_line_error(argv, capsys)
    assert "bad.yaml: not valid YAML (line" in msg


def test_prompt_file_that_is_not_yaml(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text("classes:\n  luad: [adenocarcinoma\n  lusc: squamous\n  : :\n")
    with pytest.raises(ConfigError, match=r"prompts\.yaml: not valid YAML \(line \d+"):
        load_prompts(p)


def test_text_tower_section_of_the_wrong_shape(tmp_path, capsys):
    argv = ["align", "--config", "tiny", "--embeddings", str(tmp_path / "e.h5"), "--manifest",
            str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]  # fmt: skip
    msg = _one_line_error(argv + ["--set", "model.text.bogus=1"], capsys)
    assert "Unknown TextTowerConfig option(s): bogus" in msg  # before: TypeError traceback
    msg = _one_line_error(argv + ["--set", "model.text=7"], capsys)
    assert "option 'text' must be dict, got 7" in msg  # typed config check names the section


def _truncated(path, size=64):
    path.write_bytes(b"PK\x03\x04" + bytes(size))
    return path


def test_truncated_checkpoints_are_one_line_errors(tmp_path, capsys):
    feats = tmp_path / "f"
    write_random_bags(feats, num=2, dim=8)
    ck = _truncated(tmp_path / "encoder.pt")
    msg = _one_line_error(
        ["embed-slides", "--checkpoint", str(ck), "--features", str(feats), "--out",
         str(tmp_path / "e.h5")], capsys)  # fmt: skip
    assert "encoder.pt: not a readable slide encoder checkpoint" in msg
    good = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a real, truncated file
    msg = _one_line_error(
        ["heatmap", "--features", str(feats / "bag0.h5"), "--checkpoint", str(cut), "--out",
         str(tmp_path / "hm")], capsys)  # fmt: skip
    assert "cut.pt: not a readable MIL checkpoint" in msg
    msg = _one_line_error(
        ["zero-shot", "--checkpoint", str(cut), "--features", str(feats), "--prompts",
         "lung_subtypes", "--out", str(tmp_path / "zs")], capsys)  # fmt: skip
    assert "cut.pt: not a readable alignment checkpoint" in msg


def test_output_path_under_a_file_is_one_line(tmp_path, capsys):
    from slidefm.io.embeddings import write_embeddings

    ids = ["a", "b", "c", "d"]
    h5 = write_embeddings(tmp_path / "e.h5", ids, np.eye(4, dtype=np.float32),
                          {"checkpoint_sha256": "x", "seed": 0, "encoder_config": "t"})  # fmt: skip
    m = tmp_path / "m.csv"
    m.write_text("slide_id,case_id,y\na,a,0\nb,b,1\nc,c,0\nd,d,1\n")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    msg = _one_line_error(["probe", "--embeddings", str(h5), "--manifest", str(m), "--label",
                           "y", "--out", str(blocker / "sub")], capsys)  # fmt: skip
    assert "afile" in msg


def test_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    import slidefm.pipelines.info as info

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setattr(info, "run", boom)  # the parser is built inside main: it gets boom
    msg = _one_line_error(["info", "any.svs"], capsys)
    assert "KeyError" in msg and "surprise" in msg and "slidefm -v info" in msg


# -- heatmap --slide --------------------------------------------------------------------------
def _mil_ckpt(path, dim=8):
    from slidefm.models.mil import build_mil_model, save_mil_checkpoint

    meta = {"model": "abmil", "in_dim": dim, "num_classes": 2, "model_kwargs": {"hidden": 8},
            "task": {"labels": ["m"], "classes": ["0", "1"], "multilabel": False}}  # fmt: skip
    torch.manual_seed(0)
    return save_mil_checkpoint(path, build_mil_model("abmil", dim, 2, hidden=8), meta)


def _features_of(path, slide, w, h, size, s=256):
    xs, ys = np.meshgrid(np.arange(0, w - s, s), np.arange(0, h - s, s))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    n = len(coords)
    attrs = {"encoder": "test", "encoder_weights": "random", "target_mpp": 0.5,
             "patch_size": 256, "patch_size_level0": s, "config_hash": "x", "seed": 0,
             "source_path": str(slide), "source_size": size, "level0_width": w,
             "level0_height": h}  # fmt: skip
    sf = SlideFeatures("s", np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32),
                       coords, grid_from_coords(coords, s), np.ones(n, np.float32), attrs)  # fmt: skip
    return write_features(path, sf)


def test_heatmap_refuses_another_slide(tmp_path, capsys, sample_slide, slides_dir):
    ck = _mil_ckpt(tmp_path / "m.pt")
    size = sample_slide.stat().st_size
    own = _features_of(tmp_path / "own.h5", sample_slide, 2220, 2967, size)
    base = ["--checkpoint", str(ck), "--max-size", "256"]
    assert main(["heatmap", "--slide", str(sample_slide), "--features", str(own), *base,
                 "--out", str(tmp_path / "ok")]) == 0  # fmt: skip
    other = slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"
    msg = _one_line_error(["heatmap", "--slide", str(other), "--features", str(own), *base,
                           "--out", str(tmp_path / "bad")], capsys)  # fmt: skip
    assert "is not the slide" in msg and "2220×2967" in msg and "CMU-1-Small-Region" in msg
    assert not (tmp_path / "bad").exists()  # nothing drawn over the wrong image
    # same size, other file content (a replaced slide): the byte count differs
    wrong_size = _features_of(tmp_path / "ws.h5", sample_slide, 2220, 2967, size + 1)
    msg = _one_line_error(["heatmap", "--slide", str(sample_slide), "--features",
                           str(wrong_size), *base, "--out", str(tmp_path / "b2")], capsys)  # fmt: skip
    assert f"it has {size} bytes, the encoded slide {size + 1}" in msg


# -- train-tokenizer ----------------------------------------------------------------------
def test_tokenizer_states_the_real_minimum_and_maximum(tmp_path, capsys):
    rich = " ".join(string.ascii_letters + string.digits + string.punctuation + "éèàüöäßçµ°±×")
    csv = tmp_path / "r.csv"
    csv.write_text("text\n" + "\n".join(f'"{rich.replace(chr(34), "")} tumour {i}."'
                                        for i in range(30)) + "\n")  # fmt: skip
    out = str(tmp_path / "tok.model")
    msg = _one_line_error(["train-tokenizer", "--reports", str(csv), "--vocab-size", "300",
                           "--out", out], capsys)  # fmt: skip
    low = int(msg.split("below the minimum ")[1].split()[0])
    assert low > 300 and "raise it to at least" in msg and "lower it" not in msg
    # the stated minimum is the real one: it trains there and fails one below
    assert (
        main(["train-tokenizer", "--reports", str(csv), "--vocab-size", str(low), "--out", out])
        == 0
    )
    msg = _one_line_error(["train-tokenizer", "--reports", str(csv), "--vocab-size", "100000",
                           "--out", out], capsys)  # fmt: skip
    high = int(msg.split("above the maximum ")[1].split()[0])
    assert "lower it to at most" in msg
    assert (
        main(["train-tokenizer", "--reports", str(csv), "--vocab-size", str(high), "--out", out])
        == 0
    )
    _one_line_error(["train-tokenizer", "--reports", str(csv), "--vocab-size", str(low - 1),
                     "--out", out], capsys)  # fmt: skip
