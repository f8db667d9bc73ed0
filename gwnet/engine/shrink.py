"""``train.shrink_from``: start a smaller Graph WaveNet from a trained one's best weights.

Which teacher tensor each student tensor comes from is :mod:`gwnet.nn.shrink`'s mapping
(same dilations; first and last block kept; leading channels). The teacher run is only read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, fields_with_role
from ..data import TrafficData
from ..errors import file_error
from ..nn.shrink import shrink_state_dict
from .checkpoint import RunDir, load_checkpoint

# What a student may have less of than its teacher.
SHRINKABLE = ("blocks", "layers", "residual_channels", "dilation_channels", "skip_channels", "end_channels")
# Model options that may differ anyway (as at --init-from): horizons, dropout, kernels.
FREE_ROLES = ("output", "regularization", "kernel")


def shrink_from_run(model: torch.nn.Module, cfg: Config, data: TrafficData, run_dir: str | Path) -> None:
    """Fill ``model`` (a Graph WaveNet of ``cfg``) from the best weights of the Graph WaveNet
    run in ``run_dir``; one line naming the file when the two cannot be mapped."""
    path = RunDir(run_dir).best
    state = load_checkpoint(path, kind="best")  # every entry checked: a teacher's file is input
    theirs = state.get("config", {})
    arch = theirs.get("arch", "gwnet")
    if arch != "gwnet" or cfg.arch != "gwnet":
        raise file_error(path, f"shrink_from maps Graph WaveNet layers: the teacher is a {arch} model, this "
                         f"run trains {cfg.arch}")
    if list(state["sensor_ids"]) != list(data.sensor_ids):
        raise file_error(path, "was trained on other sensors than this run's data")
    teacher_cfg = Config.from_dict(theirs, source=str(path)).model
    ours = cfg.model
    free = set(SHRINKABLE) | set(fields_with_role(ours, *FREE_ROLES))
    differ = [k for k in ours.__dataclass_fields__ if k not in free and getattr(teacher_cfg, k) != getattr(ours, k)]
    if differ:
        shown = ", ".join(f"{k} {getattr(teacher_cfg, k)!r} vs {getattr(ours, k)!r}" for k in differ[:3])
        raise file_error(path, f"model does not match this run's beyond its size ({shown})")
    larger = [k for k in SHRINKABLE if getattr(ours, k) > getattr(teacher_cfg, k)]
    if larger or ours.out_dim > teacher_cfg.out_dim:
        k = larger[0] if larger else "out_dim"
        raise file_error(path, f"the student must not be larger than the teacher: {k} {getattr(ours, k)} "
                         f"here, {getattr(teacher_cfg, k)} there")
    try:
        filled = shrink_state_dict(teacher_cfg, state["model"], ours, model.state_dict())
    except ValueError as exc:
        raise file_error(path, str(exc)) from None
    model.load_state_dict(filled)
