"""Where a model runs and in which precision: the few helpers training and inference share."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..errors import GWNetError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a one-line error otherwise."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GWNetError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GWNetError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for; fp32 runs untouched."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
