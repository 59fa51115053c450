"""The one config mechanism: typed nested sections, one precedence rule (YAML < flags < --set)
for every command, every ``--set`` applied, every config error one ``ConfigError`` line."""

from __future__ import annotations

import dataclasses

import pytest
from test_cli_errors import _one_line_error

from slidefm.cli import build_parser, iter_commands, main
from slidefm.config import ConfigError, flag_values, from_dict, load_config, non_default


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 3
    scale: tuple[float, float] = (0.1, 0.4)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "a"
    inner: Inner = dataclasses.field(default_factory=Inner)
    maybe: Inner | None = None


def test_nested_sections_are_built_and_checked():
    cfg = from_dict(Outer, {"inner": {"size": 5, "scale": [0.2, 0.3]}, "maybe": {"size": 1}})
    assert cfg.inner == Inner(5, (0.2, 0.3)) and cfg.maybe == Inner(1)  # list → tuple
    assert from_dict(Outer, {"maybe": None}).maybe is None
    with pytest.raises(ConfigError, match=r"^inner: Unknown Inner option\(s\): bogus"):
        from_dict(Outer, {"inner": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"^inner: Inner option 'size' must be int, got 'x'"):
        from_dict(Outer, {"inner": {"size": "x"}})
    with pytest.raises(ConfigError, match=r"option 'inner' must be dict, got 4"):
        from_dict(Outer, {"inner": 4})


def test_non_default_lists_what_was_set():
    assert non_default(Outer()) == {}
    assert non_default(Outer(inner=Inner(scale=(0.2, 0.4)))) == {"inner": {"scale": [0.2, 0.4]}}


def test_precedence_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: yaml\ninner: {size: 7}\n")
    assert load_config(Outer, path).name == "yaml"
    assert load_config(Outer, path, flags={"name": "flag"}).name == "flag"
    cfg = load_config(Outer, path, ["name=set"], flags={"name": "flag", "inner.size": 9})
    assert (cfg.name, cfg.inner.size) == ("set", 9)
    assert load_config(Outer, path, ["inner.size=8"], flags={"inner.size": 9}).inner.size == 8


def _args(argv):
    return build_parser().parse_args(argv)


def test_encode_slides_set_beats_flags_beat_yaml(tmp_path):
    from slidefm.pipelines.encode import config_from_args

    base = ["encode-slides", "x.svs", "--out", str(tmp_path), "--config", "default"]
    assert config_from_args(_args(base)).target_mpp == 0.5  # configs/encode/default.yaml
    flags = base + ["--target-mpp", "0.25", "--tissue", "brightfield", "--no-qc"]
    cfg = config_from_args(_args(flags))
    assert (cfg.target_mpp, cfg.tissue.mode, cfg.qc) == (0.25, "brightfield", False)
    over = ["--set", "target_mpp=1.0", "--set", "tissue.mode=fluorescence", "--set", "qc=true"]
    cfg = config_from_args(_args(flags + over))
    assert (cfg.target_mpp, cfg.tissue.mode, cfg.qc) == (1.0, "fluorescence", True)
    assert cfg.tissue.min_saturation == 0.07  # the other TissueConfig fields keep defaults


def test_synth_cohort_set_beats_flags_beat_yaml(tmp_path):
    from slidefm.pipelines.synth import options_from_args

    base = ["synth-cohort", "--out", str(tmp_path), "--config", "tiny"]
    assert options_from_args(_args(base)).cells == 6  # configs/synth/tiny.yaml
    assert options_from_args(_args(base + ["--cells", "10"])).cells == 10
    assert options_from_args(_args(base + ["--cells", "10", "--set", "cells=8"])).cells == 8
    assert options_from_args(_args(base + ["--quality", "70"])).jpeg_quality == 70


def test_mil_train_set_beats_flags_beat_yaml(tmp_path):
    from slidefm.pipelines.mil import config_from_args

    base = ["mil", "train", "--manifest", "m.csv", "--features", "f", "--label", "y", "--out",
            str(tmp_path)]  # fmt: skip
    yaml_epochs = config_from_args(_args(base)).epochs
    flag = base + ["--epochs", str(yaml_epochs + 2)]
    assert config_from_args(_args(flag)).epochs == yaml_epochs + 2
    argv = flag + ["--set", f"epochs={yaml_epochs + 1}"]
    assert config_from_args(_args(argv)).epochs == yaml_epochs + 1


def test_align_set_beats_the_slide_encoder_flag(tmp_path, monkeypatch):
    import slidefm.train.align as align

    seen = {}

    def fake_run_align(config, manifest, out, **kw):
        seen["cfg"] = align.load_run_config(config, kw["overrides"], kw["flags"])
        return {"steps": 0, "num_train_cases": 0}

    monkeypatch.setattr(align, "run_align", fake_run_align)
    base = ["align", "--config", "tiny", "--embeddings", "e.h5", "--manifest", "m.csv", "--out",
            str(tmp_path), "--set", "data.batch_size=3"]  # fmt: skip
    assert main(base + ["--slide-encoder", "flag.pt"]) == 0
    assert seen["cfg"].slide_encoder == "flag.pt" and seen["cfg"].data.batch_size == 3
    assert main(base + ["--slide-encoder", "flag.pt", "--set", "slide_encoder=set.pt"]) == 0
    assert seen["cfg"].slide_encoder == "set.pt"


def _set_commands(tmp_path) -> dict[tuple[str, ...], list[str]]:
    """Minimal command lines of every command that takes ``--set`` (inputs that exist only as
    far as the command reads them before its config)."""
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    out = ["--out", str(tmp_path / "o")]
    return {
        ("synth-cohort",): ["synth-cohort", *out],
        ("encode-slides",): ["encode-slides", str(slide), *out],
        ("pretrain",): ["pretrain", "--config", "tiny", "--features", str(tmp_path), *out],
        ("pretrain-tiles",): ["pretrain-tiles", str(slide), "--encoder", "vit_tiny_dev", *out],
        ("align",): [
            "align",
            "--config",
            "tiny",
            "--embeddings",
            "e.h5",
            "--manifest",
            "m.csv",
            *out,
        ],  # fmt: skip
        ("mil", "train"): [
            "mil",
            "train",
            "--manifest",
            "m.csv",
            "--features",
            "f",
            "--label",
            "y",
            *out,
        ],  # fmt: skip
    }


def test_every_command_with_set_applies_it(tmp_path, capsys):
    """An override no command reads is an error everywhere, before any work: no command
    offers --set and silently ignores it (the list is the parser's, so a new one must be
    added here)."""
    parser = build_parser()
    with_set = set()
    for path in iter_commands(parser):
        sub = parser
        for name in path:
            sub = next(
                a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"
            ).choices[name]
        if any(a.dest == "overrides" for a in sub._actions):
            with_set.add(path)
    cmds = _set_commands(tmp_path)
    assert with_set == set(cmds)
    for path, argv in cmds.items():
        msg = _one_line_error(argv + ["--set", "bogus_option=1"], capsys)
        assert "Unknown" in msg and "bogus_option" in msg, (path, msg)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "target_mpp=fine"], "option 'target_mpp' must be float, got 'fine'"),
        (["--set", "stain_norm=reinhard"], "stain_norm must be one of none, macenko"),
        (["--set", "tissue.bogus=1"], "tissue: Unknown TissueConfig option(s): bogus"),
        (["--set", "tissue.mode=dark"], "tissue mode must be one of auto, brightfield"),
        (["--set", "tissue=3"], "option 'tissue' must be dict, got 3"),
    ],
)
def test_encode_config_errors_are_one_line(tmp_path, capsys, extra, expected):
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    msg = _one_line_error(["encode-slides", str(slide), "--out", str(tmp_path / "o"), *extra],
                          capsys)  # fmt: skip
    assert expected in msg
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_training_config_errors_are_one_line(tmp_path, capsys):
    base = ["pretrain", "--config", "tiny", "--features", str(tmp_path), "--out",
            str(tmp_path / "o")]  # fmt: skip
    msg = _one_line_error(base + ["--set", "train.out_dir=x"], capsys)
    assert "train.out_dir come from --out/--seed" in msg
    msg = _one_line_error(base + ["--set", "objective.bogus=1"], capsys)
    assert "objective: Unknown PretrainConfig option(s): bogus" in msg
    msg = _one_line_error(base + ["--set", "encoder_overrides.depthh=2"], capsys)
    assert "Unknown SlideEncoderConfig option(s): depthh" in msg
    tiles = ["pretrain-tiles", str(tmp_path), "--encoder", "vit_tiny_dev", "--out",
             str(tmp_path / "t")]  # fmt: skip
    (tmp_path / "a.svs").write_bytes(b"x")
    msg = _one_line_error(tiles + ["--set", "patches.tissue.bogus=1"], capsys)
    assert "patches.tissue: Unknown TissueConfig option(s): bogus" in msg


def test_flag_values_only_given_flags():
    class A:
        target_mpp = None
        tissue = "auto"

    assert flag_values(A(), {"target_mpp": "target_mpp", "tissue": "tissue.mode"}) == {
        "tissue.mode": "auto"
    }


def test_encode_hash_of_typed_tissue_is_the_mapping_hash_it_always_was():
    """Feature folders written when ``tissue`` was a plain mapping still count as complete:
    the hash takes the tissue options that were set, as that mapping held them."""
    from slidefm.config import config_hash
    from slidefm.encoders.encode_config import OUTPUT_FIELDS, EncodeConfig, slide_hash
    from slidefm.wsi.jobs import SlideJob

    rt = {"device": "cpu", "precision": "fp32"}
    tissue = {"mode": "fluorescence", "pen_hue_range": [0.1, 0.6]}
    cfg = from_dict(EncodeConfig, {"tissue": tissue, "target_mpp": 1.0})
    old = {k: getattr(cfg, k) for k in OUTPUT_FIELDS} | {"tissue": tissue, "seed": 3, **rt}
    assert slide_hash(cfg, SlideJob("a", "a.svs"), 3, rt) == config_hash(old)


@dataclasses.dataclass(frozen=True)
class Other:
    width: int = 1


@dataclasses.dataclass(frozen=True)
class Either:
    head: Inner | Other | dict = dataclasses.field(default_factory=dict)


def test_a_union_of_sections_is_left_to_the_class():
    """Only ``X`` / ``X | None`` is built as a section: which member of a union a mapping
    means is the class's to decide (e.g. MIL head options chosen by the model name)."""
    assert from_dict(Either, {"head": {"width": 2}}).head == {"width": 2}


def test_exponent_floats_without_a_dot_are_numbers(tmp_path) -> None:
    """PyYAML (YAML 1.1) reads ``5e-4`` as a string; in slidefm configs and --set it is 0.0005."""
    from slidefm.config import apply_overrides, load_yaml

    got = apply_overrides({}, ["lr=5e-4", "big=1E3", "neg=-2e+2", "name=v1e3", "word=1e"])
    assert got == {"lr": 0.0005, "big": 1000.0, "neg": -200.0, "name": "v1e3", "word": "1e"}
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-4\n  steps: 10\n")
    assert load_yaml(path) == {"train": {"lr": 0.0005, "steps": 10}}
