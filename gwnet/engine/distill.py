"""Targets beside the readings: the trainer's hook for distillation.

A run trained with ``train.teacher`` learns from a teacher's forecasts as well as (or instead
of) the readings. The trainer knows nothing of ensembles: it takes an :class:`ExtraTargets`
object, asks it once to get ready (:meth:`ExtraTargets.prepare`, after the run directory is
the trainer's and before the first batch) and then, for each training batch, for the
forecasts of the batch's windows (:meth:`ExtraTargets.targets`). How the two targets make
one loss is :func:`batch_loss`, by ``train.distill_mode``:

``kd``      ``alpha * loss(pred, readings) + (1 - alpha) * loss(pred, teacher)``
            (knowledge distillation; ``alpha = 1`` trains exactly as without a teacher)
``pseudo``  ``loss(pred, teacher)``: the teacher's forecasts are the targets (pseudo-labels)
``fill``    ``loss(pred, readings where present, else the teacher's forecast)``

Validation, early stopping and every reported metric stay on the readings.
:mod:`gwnet.ensemble.distill` provides the teacher ensemble's forecasts (cached per window).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from .metrics import valid_mask

Trainer = Any  # gwnet.engine.trainer.Trainer (which imports this module)


class ExtraTargets(Protocol):
    """Forecasts of a run's training windows, in real units, from something other than the
    readings (a teacher)."""

    def prepare(self, trainer: Trainer) -> None:
        """Get ready to answer :meth:`targets` (e.g. compute and cache the forecasts in the
        run directory); called once per trainer, after the run directory is locked and checked."""

    def targets(self, split: str, positions: torch.Tensor) -> torch.Tensor:
        """``(B, H, N)`` forecasts of the windows at ``positions`` of ``split`` (``H`` at least
        the run's horizons)."""


def batch_loss(trainer: Trainer, pred: torch.Tensor, y: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch: ``trainer.loss_fn`` on the readings ``y``, or with
    ``trainer.extra_targets`` the mix ``train.distill_mode`` says (see the module docstring)."""
    t = trainer.cfg.train
    extra = getattr(trainer, "extra_targets", None)
    if extra is None:
        return trainer.loss_fn(pred, y, t.null_value)
    teacher = extra.targets("train", positions)[:, :y.shape[1]].to(device=y.device, dtype=y.dtype)
    return mixed_loss(trainer.loss_fn, pred, y, teacher, t.distill_mode, t.distill_alpha, t.null_value)


def mixed_loss(loss_fn, pred: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, mode: str, alpha: float,
               null_value: float) -> torch.Tensor:
    """``loss_fn`` against the readings ``y`` and the teacher's forecasts as ``mode`` mixes them."""
    if mode == "kd":
        # Both terms always: with alpha = 1 the teacher's term is exactly 0 and so is its
        # gradient, so the run is the one without a teacher, bit for bit.
        return alpha * loss_fn(pred, y, null_value) + (1 - alpha) * loss_fn(pred, teacher, null_value)
    if mode == "pseudo":
        return loss_fn(pred, teacher, null_value)
    if mode == "fill":
        return loss_fn(pred, torch.where(valid_mask(y, null_value), y, teacher), null_value)
    raise ValueError(f"unknown distill_mode {mode!r}")
