"""Every command line the README documents runs as written, from a folder outside the repo.

Command lines are the rows of the README's command table and the lines of its ```bash blocks,
in document order (the table follows the data flow, so each row reads what earlier rows wrote).
A ``<name>`` placeholder is an input from ``INPUTS`` below (tiny values: a 24-slide cohort, a
random-weight dev tile encoder) or, for any other name, a fresh path ``<tmp>/<name>`` (outputs
are named by the README). Lines the README documents as failing offline must fail with their
documented message, never silently.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from slidefm.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PLACEHOLDER = re.compile(r"<([a-z0-9_-]+)>")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# The README's entry points run by CI itself (`make test`) or measured by hand (`make demo`,
# minutes of CPU; figure in the README).
NOT_RUN_HERE = {"make demo", "make test"}

# README line (a unique substring) → the one-line error it must end with offline.
EXPECTED_ERRORS = {
    "--encoder uni --weights hub": "huggingface-cli download",  # no network, no HF cache
    "--weights <ckpt>/uni.bin": "does not exist",
    "--model gigapath --weights hub": "are not available",  # published slide encoders
    "--model titan --weights ~/models/TITAN": "not found",
    "--model chief --weights ~/models/CHIEF_pretraining.pth": "not found",
    "--slide-encoder titan --slide-encoder-weights ~": "titan expects 768-d conch_v15 features",
    "--set encoder=titan": "titan expects 768-d conch_v15 features",
    "--slide-encoder-weights <pre-titan>": "titan expects 768-d conch_v15 features",
}


def readme_command_lines(text: str) -> list[str]:
    """Command lines of the README in order: table rows' first cell (a ``slidefm …`` code span)
    and the commands of ```bash blocks (``\\`` continuations joined, comments dropped)."""
    lines, in_bash, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            in_bash = raw.strip() == "```bash" and not in_bash
            continue
        if in_bash:
            if raw.rstrip().endswith("\\"):  # continued on the next line
                pending += raw.rstrip()[:-1] + " "
                continue
            cmd = " ".join(shlex.split(pending + raw, comments=True))
            pending = ""
            if cmd:
                lines.append(cmd)
        else:
            m = re.match(r"\|\s*`(slidefm [^`]+)`\s*\|", raw)
            if m:
                lines.append(m.group(1))
    return lines


def _first_slide(tmp: Path) -> pd.Series:
    return pd.read_csv(tmp / "cohort" / "manifest.csv").iloc[0]


# Inputs the README leaves to the user; evaluated when a line needs them (the cohort exists
# once the README's synth-cohort line has run).
INPUTS: dict[str, Callable[[Path], str]] = {
    "n": lambda tmp: "24",
    "encoder": lambda tmp: "vit_tiny_dev",
    "weights": lambda tmp: "random",
    "vocab": lambda tmp: "400",
    "ckpt": lambda tmp: str(tmp / "no-such-checkpoint-folder"),
    "slide": lambda tmp: str(tmp / "cohort" / _first_slide(tmp)["path"]),  # relative to manifest
    "slide_id": lambda tmp: str(_first_slide(tmp)["slide_id"]),
}


def substitute(line: str, tmp: Path) -> list[str]:
    """argv of a README line: placeholders filled, the leading ``slidefm`` dropped."""
    filled = PLACEHOLDER.sub(
        lambda m: INPUTS[m[1]](tmp) if m[1] in INPUTS else str(tmp / m[1]), line
    )
    argv = shlex.split(filled)
    assert argv[0] == "slidefm", line
    return argv[1:]


def test_readme_lists_the_commands_it_claims():
    """The parser finds the table and the code blocks (a README reformat must not silently
    leave commands untested)."""
    lines = readme_command_lines(README.read_text())
    for c in ("slidefm mil train ", "slidefm align ", "slidefm zero-shot ", "slidefm heatmap "):
        assert any(ln.startswith(c) for ln in lines), lines
    assert set(lines) >= NOT_RUN_HERE
    for key in EXPECTED_ERRORS:
        assert sum(key in ln for ln in lines) == 1, key


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    work = tmp_path / "elsewhere"  # not the repo root: configs/… must resolve from the package
    work.mkdir()
    monkeypatch.chdir(work)
    ran = []
    for line in readme_command_lines(README.read_text()):
        if line in NOT_RUN_HERE:
            continue
        argv = substitute(line, tmp_path)
        if argv[0] == "view":  # a server that runs until Ctrl-C: build it, do not serve
            from slidefm.viewer.app import create_app
            from slidefm.viewer.build import build_viewer

            rc = 0 if create_app(build_viewer(build_parser().parse_args(argv))) else 1
        else:
            rc = main(argv)
        out, err = capsys.readouterr()
        expected = next((msg for key, msg in EXPECTED_ERRORS.items() if key in line), None)
        if expected is None:
            assert rc == 0, f"README line failed (rc {rc}): {line}\n{err[-2000:]}"
        else:
            assert rc == 0 or expected in err, f"{line}: rc {rc}, expected {expected!r}\n{err}"
        ran.append(line)
    assert len(ran) >= 21, ran
    # The outputs the later README lines read exist where the earlier ones wrote them.
    assert (tmp_path / "pretrain" / "encoder.pt").is_file()
    assert (tmp_path / "align" / "align.pt").is_file()
    assert (tmp_path / "zero-shot" / "predictions.csv").is_file()
    assert (tmp_path / "heatmap").is_dir() and any((tmp_path / "heatmap").glob("*.geojson"))
    assert (tmp_path / "tokenizer.model").is_file()
