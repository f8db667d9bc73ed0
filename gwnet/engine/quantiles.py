r"""Quantile forecasts: the masked pinball loss, CRPS from quantiles and the median as the point.

A model trained with ``model.quantiles`` (see :mod:`gwnet.models.quantiles`) forecasts
``(B, H, Q, N)``: for each horizon, one value per quantile level. The pinball (quantile) loss
of level :math:`\tau` and error :math:`e = y - \hat q_\tau` is

.. math::
    \rho_\tau(e) = \max(\tau e, (\tau - 1) e),

averaged over the levels and the valid readings only: a reading equal to ``null_value`` is
masked exactly as :func:`~gwnet.engine.metrics.masked_mae` masks it. The CRPS is estimated
from the quantiles as :math:`2 \cdot \mathrm{mean}_\tau \rho_\tau` (the quantile decomposition
:math:`\mathrm{CRPS} = 2 \int_0^1 \rho_\tau \, d\tau` on the trained levels): for a point
forecast (every quantile equal) with levels symmetric about 0.5 it is the absolute error.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .metrics import valid_mask


def pinball(pred: torch.Tensor, target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Elementwise pinball loss of ``pred`` ``(B, H, Q, N)`` against ``target`` ``(B, H, N)``
    at ``levels`` ``(Q,)``; ``(B, H, Q, N)``."""
    levels = levels.to(pred.dtype).view(1, 1, -1, 1)
    err = target.unsqueeze(2) - pred
    return torch.maximum(levels * err, (levels - 1) * err)


def masked_pinball(pred: torch.Tensor, target: torch.Tensor, levels: Sequence[float],
                   null_value: float = 0.0) -> torch.Tensor:
    """Mean pinball loss over the quantile levels and the valid readings (0 when none is)."""
    if pred.dim() != 4:
        raise ValueError(f"quantile forecasts are (batch, horizons, quantiles, nodes), got {tuple(pred.shape)}")
    mask = valid_mask(target, null_value)
    loss = pinball(pred, target, torch.as_tensor(list(levels), device=pred.device)).mean(dim=2)
    loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return loss.sum() / mask.sum().clamp(min=1)


def pinball_loss_fn(levels: Sequence[float]):
    """A trainer loss ``(pred, target, null_value) -> loss`` for quantile forecasts at ``levels``:
    ``2 x`` the pinball losses summed over the levels. The median's term ``2 rho_0.5 = |e|`` is
    then exactly a point run's masked MAE, so the median learns at the point run's scale (with
    Adam's L2 weight decay, a loss averaged over the levels would weaken its signal against
    the decay by the number of levels) and the other levels add their own terms."""
    levels = tuple(float(q) for q in levels)

    def loss(pred: torch.Tensor, target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
        return 2 * len(levels) * masked_pinball(pred, target, levels, null_value)

    loss.__name__ = "masked_pinball"
    return loss


def median_index(levels: Sequence[float]) -> int:
    """Position of the 0.5 level: the point forecast of a quantile run."""
    return [float(q) for q in levels].index(0.5)


def point_forecast(pred: torch.Tensor, levels: Sequence[float] | None) -> torch.Tensor:
    """``(B, H, N)``: ``pred`` itself for a point model, its median for a quantile model."""
    if pred.dim() == 4:
        if levels is None:
            raise ValueError("a (batch, horizons, quantiles, nodes) forecast needs its quantile levels")
        return pred[:, :, median_index(levels)]
    return pred
