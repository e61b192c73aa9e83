"""Wall-clock seconds and peak memory of one call, in this process (CPU or CUDA).

CPU: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with freed memory trimmed
first (``malloc_trim``), so that freed blocks return to the system and the peak is the call's own
(a retained heap would hide it). CUDA: ``torch.cuda.max_memory_allocated``, times synchronised.
``release(model)`` drops what a TransformerLens 4.3 joint-QKV bridge keeps after a forward pass
(each layer's pattern), so that one measurement does not inherit the previous one's."""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["measure", "release"]

_LIBC = ctypes.CDLL("libc.so.6")


def release(model: Any) -> None:
    """Set to None every non-parameter tensor attribute of the model's blocks (activations a
    bridge kept from the last forward pass)."""
    for module in model.blocks.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(module, name, None)


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def measure(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float, Any]:
    """``(seconds, peak MiB above the memory in use before the call, fn's result)``."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _status("VmHWM")
    return seconds, peak - base, out
