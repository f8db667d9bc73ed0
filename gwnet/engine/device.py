"""Where a model runs and in which precision: the few helpers training and inference share."""
from __future__ import annotations

import re
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
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
