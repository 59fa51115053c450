"""Shared fixtures. Real data comes from ../shared/data (or $SLIDEFM_SHARED_DATA).

When SLIDEFM_SHARED_DATA is set (CI, `make test`) and the folder is missing, tests fail rather
than skip, so CI can never pass silently without the real slides.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path:
    env = os.environ.get("SLIDEFM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = _shared_data_dir()
    if not d.is_dir():
        if os.environ.get("SLIDEFM_SHARED_DATA"):
            pytest.fail(f"SLIDEFM_SHARED_DATA={d} does not exist: real-data tests cannot run")
        pytest.skip(f"{d} not found; set SLIDEFM_SHARED_DATA to run real-data tests")
    return d


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids oversubscribing shared CPUs (10-50x faster here).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """The real slide bundled in the repo (CMU-1-Small-Region, CC0)."""
    return REPO / "data" / "sample" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Name of a tiny open_clip model config (1-layer towers, 16-d joint space), registered
    with ``open_clip.add_model_config`` for the test session."""
    import json

    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("open_clip") / "slidefm-test-tiny.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return path.stem
