"""Seeds, devices and autocast: the few runtime decisions every pipeline makes the same way."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch loads when a function runs, so `slidefm --help` stays fast
    import torch

F = TypeVar("F", bound=Callable[..., Any])


def no_grad(fn: F) -> F:
    """``torch.no_grad()`` as a decorator that imports torch only when ``fn`` is called."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run is reproducible."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def pick_device(pref: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else CPU; anything else is passed to torch.device."""
    import torch

    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def autocast(device: torch.device, precision: str = "auto"):
    """bf16/fp16 autocast on CUDA; a no-op on CPU or with precision ``fp32``.

    ``auto`` picks bf16 where the GPU supports it, else fp16.
    """
    import torch

    precision = effective_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast("cuda", dtype=dtype)


def effective_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision ``autocast`` really uses: ``fp32`` on CPU, ``auto`` resolved on CUDA."""
    if device.type != "cuda" or precision == "fp32":
        return "fp32"
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_INTERRUPTED = False


def _on_sigint(signum: int, frame: Any) -> None:
    global _INTERRUPTED
    _INTERRUPTED = True
    raise KeyboardInterrupt


def install_interrupt_flag() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: an interrupt raised while
    Python runs a destructor (e.g. a DataLoader shutting its workers down between slides) is
    swallowed by the interpreter, so long loops call ``check_interrupted`` at safe points."""
    import signal

    signal.signal(signal.SIGINT, _on_sigint)


def check_interrupted() -> None:
    """Re-raise a Ctrl-C that arrived but was swallowed (see ``install_interrupt_flag``)."""
    if _INTERRUPTED:
        raise KeyboardInterrupt
