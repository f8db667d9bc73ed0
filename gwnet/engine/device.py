"""Where a model runs and in which precision: the few helpers training and inference share."""
from __future__ import annotations

import functools
import re
import warnings
from contextlib import nullcontext

import torch

from ..errors import GWNetError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error otherwise."""
    if isinstance(name, torch.device):
        if name.type not in ("cpu", "cuda"):
            raise GWNetError(f"unsupported device {str(name)!r}; use cpu, cuda, cuda:N or auto")
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Only what a run can use: meta tensors hold no values, mps and others are untested.
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise GWNetError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GWNetError(f"device {name!r} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GWNetError(f"device {name!r} asked for, but there are only {torch.cuda.device_count()} "
                             "CUDA device(s) (cuda:0 ...)")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for; fp32 runs untouched."""
    if precision == "bf16":
        # A CUDA graph cannot capture autocast's cache of cast weights (and a Graph WaveNet
        # forward casts each weight once, so the cache saves nothing there).
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=device.type != "cuda")
    return nullcontext()


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16). Elsewhere
    PyTorch emulates bf16 on the CPU, many times slower than fp32 (about 15x for a Graph
    WaveNet training step on an AVX2-only AMD EPYC)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:  # not Linux: nothing to read the flags from, so don't claim any
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(device: torch.device, precision: str) -> None:
    """Warn, once per run, when bf16 is asked for on a CPU that only emulates it."""
    if precision == "bf16" and device.type == "cpu" and not native_bf16():
        warnings.warn("bf16 on this CPU is emulated (it has neither AVX512-BF16 nor AMX): "
                      "expect training many times slower than fp32; use --precision fp32 here")


def place(model: torch.nn.Module, device: torch.device) -> str | None:
    """Move ``model`` to ``device`` and let a model with a per-device kernel choice
    (``select_kernel``: Graph WaveNet's ``graph_conv="auto"``) pick it there. Returns the
    model's line about its choice, or ``None``."""
    model.to(device)
    select = getattr(model, "select_kernel", None)
    return select(device) if callable(select) else None
