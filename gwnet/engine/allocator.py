"""Whether freed CPU memory is kept for the next training step (glibc's heap policy).

PyTorch allocates CPU tensors with ``malloc``. glibc serves a block above its mmap threshold
with a fresh ``mmap`` and unmaps it on ``free``; the threshold grows with the blocks freed,
but never past 32 MiB. A Graph WaveNet activation is ``N x L x B x C`` floats: at 8,600
sensors and batch 4 about 70 MB, so every activation of every step is mapped anew and the
kernel faults in and zeroes each of its pages on first touch. On a 2-core AMD EPYC that
made a training step at 8,600 sensors 1.3-1.8x slower than with the memory kept
(``experiments/large_graph.py``), and is why the step grew faster than the sensors from
2,000 (15 MB activations, below the threshold) to 8,600.

``reuse`` turns mmap off for ``malloc`` (every block comes from the heap) and raises the
trim threshold, so freed blocks serve the next step. The price: RSS stays at its peak
and, as with glibc's grown threshold, sits above the live tensors (fragmentation), and
activation checkpointing saves less of it (see :mod:`gwnet.engine.memory`). ``system``
leaves glibc as it is. ``auto`` is ``reuse`` where it pays: on CPU, without activation
checkpointing, when one activation of the run is above the mmap ceiling; below it glibc
already keeps freed blocks in its heap, and one measurement of a 2,000-sensor step with the
dense adaptive adjacency was 7-22% slower with ``reuse`` than without. The setting is process-wide
and lasts to the process's end; elsewhere than glibc (macOS, musl, Windows) nothing
changes.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from typing import Optional

import torch

from ..config import MALLOC_POLICIES

# mallopt parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Keep up to this much free memory at the top of the heap (the largest value mallopt takes).
_TRIM_THRESHOLD = 2 ** 31 - 1
# glibc's largest mmap threshold on 64-bit: blocks above it are always fresh mappings.
MMAP_CEILING = 32 * 2 ** 20


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def largest_activation_bytes(model_cfg, steps: int, num_nodes: int, batch_size: int) -> int:
    """One fp32 activation of a run over ``steps`` input steps: nodes x steps (at least the
    receptive field) x batch x the model's widest per-position channel count (1 for a model
    without channel widths)."""
    steps = max(steps, getattr(model_cfg, "receptive_field", 0) or 0)
    width = max([1] + [getattr(model_cfg, name) for name in ("residual_channels", "dilation_channels")
                       if isinstance(getattr(model_cfg, name, None), int)])
    return num_nodes * steps * batch_size * width * 4


def wants_reuse(policy: str, device: torch.device, activation_checkpointing: bool = False,
                activation_bytes: int = 0) -> bool:
    """Whether ``policy`` keeps freed memory for a run on ``device`` whose activations are
    ``activation_bytes`` each."""
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"unknown malloc policy {policy!r}; use one of {', '.join(MALLOC_POLICIES)}")
    if policy == "auto":
        return device.type == "cpu" and not activation_checkpointing and activation_bytes > MMAP_CEILING
    return policy == "reuse"


def reuse_freed_memory() -> bool:
    """Serve every ``malloc`` from the heap and keep freed blocks there (process-wide).

    Returns whether the setting took (``False`` where the C library is not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def apply_policy(policy: str, device: torch.device, activation_checkpointing: bool = False,
                 activation_bytes: int = 0) -> bool:
    """Apply ``policy`` for a run on ``device``; whether freed memory is now kept."""
    return (wants_reuse(policy, device, activation_checkpointing, activation_bytes)
            and reuse_freed_memory())
