"""Masked forecasting metrics in real units: readings equal to ``null_value`` are ignored.

``masked_mae`` is the training loss. :class:`MetricAccumulator` sums errors over a whole
split so reported metrics are exact over all windows (not averages of batch averages), per
horizon, like the reference's test evaluation; the ``mean`` row averages the horizons.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

# MAPE in percent everywhere it is shown or written (tables, CSVs, records), hence its name.
METRICS = ("mae", "rmse", "mape_pct")


def valid_mask(target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    if math.isnan(null_value):
        return ~torch.isnan(target)
    return target != null_value


def masked_mae(pred: torch.Tensor, target: torch.Tensor, null_value: float = 0.0) -> torch.Tensor:
    """Mean absolute error over the valid readings (0 when there are none)."""
    mask = valid_mask(target, null_value)
    err = torch.where(mask, (pred - target).abs(), torch.zeros((), dtype=pred.dtype, device=pred.device))
    return err.sum() / mask.sum().clamp(min=1)


class MetricAccumulator:
    """Exact masked MAE / RMSE / MAPE per horizon over any number of ``(B, H, N)`` batches."""

    def __init__(self, horizon: int, null_value: float = 0.0, device: torch.device | str = "cpu"):
        self.null_value = null_value
        # On the training device, the sums are added there and read once (per_horizon, overall).
        self.sums = torch.zeros(4, horizon, dtype=torch.float64, device=device)  # |e|, e^2, |e|/y, count

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        device = self.sums.device
        pred, target = pred.detach().double().to(device), target.detach().double().to(device)
        mask = valid_mask(target, self.null_value)
        err = torch.where(mask, pred - target, 0.0)
        safe = torch.where(mask, target, 1.0)
        dims = (0, 2)
        self.sums += torch.stack([err.abs().sum(dims), err.square().sum(dims),
                                  (err.abs() / safe.abs()).sum(dims), mask.sum(dims).double()])

    def per_horizon(self) -> pd.DataFrame:
        """One row per horizon (1..H): mae, rmse, mape_pct (MAPE in %); NaN for a horizon
        without a valid reading."""
        abs_err, sq_err, pct_err, count = self.sums.cpu()
        n = count.clamp(min=1)
        frame = pd.DataFrame({"mae": (abs_err / n).numpy(), "rmse": (sq_err / n).sqrt().numpy(),
                              "mape_pct": (100 * pct_err / n).numpy()},
                             index=pd.RangeIndex(1, len(count) + 1, name="horizon"))
        frame[count.numpy() == 0] = float("nan")
        return frame

    def table(self) -> pd.DataFrame:
        """Per-horizon rows plus a ``mean`` row (the mean over horizons, as papers report)."""
        frame = self.per_horizon()
        frame.index = frame.index.astype(str)
        frame.loc["mean"] = frame.mean()
        frame.index.name = "horizon"
        return frame

    def overall(self) -> dict[str, float]:
        """Metrics pooled over every horizon and reading; NaN when no reading was valid."""
        abs_err, sq_err, pct_err, count = self.sums.sum(dim=1).cpu()
        if float(count) == 0:  # nothing valid was seen: no score, not a perfect 0.0
            return {name: float("nan") for name in METRICS}
        n = float(count)
        return {"mae": float(abs_err) / n, "rmse": math.sqrt(float(sq_err) / n), "mape_pct": 100 * float(pct_err) / n}
