r"""Interval and quantile metrics in real units, masked exactly like masked MAE.

For a central interval :math:`[l, u]` of nominal level :math:`1 - \alpha` and a reading :math:`y`:

coverage        share of valid readings with :math:`l \le y \le u`
width           mean :math:`u - l`
interval score  Winkler's :math:`(u - l) + \frac{2}{\alpha}(l - y)\,[y < l] + \frac{2}{\alpha}(y - u)\,[y > u]`
                (Gneiting & Raftery's interval score: lower is better, and its expectation is
                minimised by the true :math:`\alpha/2` and :math:`1 - \alpha/2` quantiles)
pinball         mean pinball loss of :math:`(l, \hat y, u)` as the :math:`\alpha/2`, 0.5 and
                :math:`1 - \alpha/2` quantiles
crps            for quantile runs, :math:`2 \cdot \mathrm{mean}_\tau \rho_\tau` over the run's own
                quantiles (:mod:`gwnet.engine.quantiles`); empty for point runs

A reading equal to ``null_value`` counts in none of them.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch

from ..engine.metrics import valid_mask
from ..engine.quantiles import pinball

INTERVAL_METRICS = ("coverage", "width", "interval_score", "pinball", "crps")


def winkler(lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Elementwise interval (Winkler) score of ``[lower, upper]`` at nominal level ``1 - alpha``."""
    below = (lower - y).clamp(min=0)
    above = (y - upper).clamp(min=0)
    return (upper - lower) + (2.0 / alpha) * (below + above)


def interval_pinball(pred: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Elementwise mean pinball loss of ``(lower, pred, upper)`` as the ``alpha/2``, 0.5 and
    ``1 - alpha/2`` quantiles."""
    stacked = torch.stack([lower, pred, upper], dim=2)
    levels = torch.tensor([alpha / 2, 0.5, 1 - alpha / 2], dtype=stacked.dtype)
    return pinball(stacked, y, levels).mean(dim=2)


def crps_from_quantiles(quantiles: torch.Tensor, y: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Elementwise CRPS estimate ``2 * mean pinball`` of ``quantiles`` ``(B, H, Q, N)``."""
    return 2.0 * pinball(quantiles, y, torch.tensor(list(levels), dtype=quantiles.dtype)).mean(dim=2)


class IntervalAccumulator:
    """Exact per-horizon sums of the interval metrics over any number of ``(B, H, N)`` batches."""

    def __init__(self, horizon: int, level: float, null_value: float = 0.0):
        self.level, self.alpha, self.null_value = level, 1.0 - level, null_value
        self.sums = torch.zeros(6, horizon, dtype=torch.float64)  # covered, width, score, pinball, crps, count
        self.has_crps = False
        self.levels: tuple[float, ...] | None = None
        self.hits: torch.Tensor | None = None  # (Q,) readings at or below each quantile

    def update(self, pred: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, actual: torch.Tensor,
               quantiles: torch.Tensor | None = None, levels: Sequence[float] | None = None) -> None:
        H = pred.shape[1]
        y = actual[:, :H].double()
        mask = valid_mask(y, self.null_value)
        pred, lower, upper = pred.double(), lower.double(), upper.double()
        zero = torch.zeros((), dtype=torch.float64)

        def total(values: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, values, zero).sum(dim=(0, 2))

        covered = ((lower <= y) & (y <= upper)).double()
        parts = [total(covered), total(upper - lower), total(winkler(lower, upper, y, self.alpha)),
                 total(interval_pinball(pred, lower, upper, y, self.alpha))]
        if quantiles is not None and levels is not None:
            parts.append(total(crps_from_quantiles(quantiles.double(), y, levels)))
            self.has_crps = True
            # Each quantile's hit rate (share of readings at or below it): ideally its level.
            below = (y.unsqueeze(2) <= quantiles.double()).double()
            hits = torch.where(mask.unsqueeze(2), below, zero).sum(dim=(0, 1, 3))
            self.levels = tuple(float(q) for q in levels)
            self.hits = hits if self.hits is None else self.hits + hits
        else:
            parts.append(torch.zeros(H, dtype=torch.float64))
        parts.append(mask.sum(dim=(0, 2)).double())
        self.sums[:, :H] += torch.stack(parts)

    def per_horizon(self) -> pd.DataFrame:
        """One row per horizon (1..H): coverage, width, interval_score, pinball, crps (NaN for
        point runs, and where a horizon has no valid reading)."""
        covered, width, score, pin, crps, count = self.sums
        n = count.clamp(min=1)
        frame = pd.DataFrame({"coverage": (covered / n).numpy(), "width": (width / n).numpy(),
                              "interval_score": (score / n).numpy(), "pinball": (pin / n).numpy(),
                              "crps": (crps / n).numpy() if self.has_crps else math.nan},
                             index=pd.RangeIndex(1, len(count) + 1, name="horizon"))
        frame[count.numpy() == 0] = math.nan
        return frame

    def quantile_hit_rates(self) -> pd.Series | None:
        """Share of the valid readings at or below each quantile of a quantile run (by level)."""
        if self.hits is None:
            return None
        n = float(self.sums[5].sum())
        return pd.Series((self.hits / max(n, 1.0)).numpy(), index=pd.Index(self.levels, name="level"))

    def overall(self) -> dict[str, float]:
        """The metrics pooled over horizons and readings."""
        covered, width, score, pin, crps, count = self.sums.sum(dim=1)
        if float(count) == 0:
            return {name: math.nan for name in INTERVAL_METRICS}
        n = float(count)
        return {"coverage": float(covered) / n, "width": float(width) / n, "interval_score": float(score) / n,
                "pinball": float(pin) / n, "crps": float(crps) / n if self.has_crps else math.nan}
