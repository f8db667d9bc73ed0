"""Shrink and fine-tune: a smaller Graph WaveNet started from a larger one's weights.

Shleifer and Rush (2020) start a shallow student with a subset of the teacher's layers and
fine-tune it. Graph WaveNet's ``blocks * layers`` residual layers come in blocks whose
dilations run 1, 2, 4, ... ``2**(layers-1)``; a temporal kernel's taps mean something only
at its dilation, so the mapping keeps dilations:

* **layers per block**: student layer ``j`` of a block (dilation ``2**j``) is the teacher's
  layer ``j`` of the mapped block, so a student with fewer layers per block keeps each
  block's short dilations and drops its longest ones;
* **blocks**: student block ``k`` of ``B_s`` is the teacher's block
  ``round(k * (B_t - 1) / (B_s - 1))`` (the first and the last block kept, the others evenly
  spaced, as Shleifer and Rush kept maximally spaced layers); a single block is the teacher's
  first;
* **channels** (residual, dilation, skip, end): the leading channels of every tensor; a
  tensor that concatenates groups along a dimension (the gated convolution's filter and gate
  rows, the graph convolution's ``order * supports + 1`` input blocks) keeps the leading
  channels of each group;
* the student's last layer feeds only the skip path (no graph convolution, no batch norm),
  so it takes the mapped layer's temporal convolution and skip projection only;
* everything else (start convolutions, adaptive adjacency, output head) is copied, sliced to
  the student's channels and horizons where it has fewer.

Every copied value is the teacher's, bit for bit. :func:`shrink_map` says which teacher
tensor each student tensor comes from.
"""
from __future__ import annotations

import re

import torch

from ..config import GWNetConfig
from ..errors import GWNetError

LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def block_map(teacher_blocks: int, student_blocks: int) -> list[int]:
    """The teacher block each student block comes from (first and last kept, evenly spaced)."""
    if student_blocks == 1:
        return [0]
    return [round(k * (teacher_blocks - 1) / (student_blocks - 1)) for k in range(student_blocks)]


def layer_map(teacher: GWNetConfig, student: GWNetConfig) -> list[int]:
    """The teacher layer index each student layer comes from (same dilation)."""
    blocks = block_map(teacher.blocks, student.blocks)
    return [blocks[i // student.layers] * teacher.layers + i % student.layers
            for i in range(student.blocks * student.layers)]


def shrink_map(teacher: GWNetConfig, student: GWNetConfig, student_keys) -> dict[str, str]:
    """``{student tensor name: teacher tensor name}`` for every tensor of the student."""
    layers = layer_map(teacher, student)
    out = {}
    for key in student_keys:
        m = LAYER.match(key)
        out[key] = f"layers.{layers[int(m.group(1))]}.{m.group(2)}" if m else key
    return out


def _groups(name: str, value: torch.Tensor, teacher: GWNetConfig) -> dict[int, int]:
    """Dimensions along which a tensor concatenates equal groups of channels."""
    if re.search(r"\.temporal\.(weight|bias)$", name):
        return {0: 2}  # filter rows, then gate rows
    if re.search(r"\.graph_conv\.weight$", name):
        # x, then each support's powers: order * supports + 1 blocks of dilation channels
        return {1: value.shape[1] // teacher.dilation_channels}
    return {}


def _take(value: torch.Tensor, shape: torch.Size, groups: dict[int, int], name: str) -> torch.Tensor:
    """The leading part of ``value`` of ``shape``, per group along grouped dimensions."""
    if value.dim() != len(shape):
        raise GWNetError(f"tensor {name} has {value.dim()} dimensions in the teacher, {len(shape)} in the student")
    out = value
    for dim, (have, want) in enumerate(zip(value.shape, shape)):
        if have == want:
            continue
        parts = groups.get(dim, 1)
        if have % parts or want % parts or want > have:
            raise GWNetError(f"tensor {name} is {tuple(value.shape)} in the teacher, {tuple(shape)} in the student: "
                             "the student must not be larger")
        pieces = out.split(have // parts, dim=dim)
        out = torch.cat([p.narrow(dim, 0, want // parts) for p in pieces], dim=dim)
    return out.clone()


def shrink_state_dict(teacher: GWNetConfig, teacher_state: dict[str, torch.Tensor], student: GWNetConfig,
                      student_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's state dict filled from the teacher's (see the module docstring)."""
    for name in ("blocks", "layers"):
        if getattr(student, name) > getattr(teacher, name):
            raise GWNetError(f"the student has more {name} ({getattr(student, name)}) than the teacher "
                             f"({getattr(teacher, name)}); shrinking copies a subset")
    mapping = shrink_map(teacher, student, student_state)
    out = {}
    for key, value in student_state.items():
        source = mapping[key]
        if source not in teacher_state:
            raise GWNetError(f"the teacher has no tensor {source} for the student's {key}")
        theirs = teacher_state[source]
        if theirs.dim() == 0:  # a counter (batch norm's num_batches_tracked)
            out[key] = theirs.clone()
            continue
        out[key] = _take(theirs, value.shape, _groups(source, theirs, teacher), key).to(value.dtype)
    return out
