r"""Interval methods: each one class registered in :data:`gwnet.registry.INTERVALS`.

Every method here is *split conformal*: it scores the forecasts of a calibration split (the
validation split) with a nonconformity score and widens by the conformal quantile of those
scores, per horizon. The forecasts are written as

.. math::
    l = a - \hat q_h s, \qquad u = b + \hat q_h s, \qquad
    \text{score} = \max\Big(\frac{a - y}{s}, \frac{y - b}{s}\Big),

with :math:`\hat q_h` the :math:`\lceil (n_h + 1)(1 - \alpha) \rceil`-th smallest of the
:math:`n_h` valid calibration scores at horizon :math:`h`. The methods differ in
:math:`(a, b, s)`:

``split``       :math:`a = b = \hat y`, :math:`s = 1`: one width per horizon (the baseline)
``normalized``  :math:`a = b = \hat y`, :math:`s = \sigma(h, \text{sensor}, \text{hour of the target})`:
                the mean absolute error of the forecast on the *training* split at that
                horizon, sensor and hour of the day (shrunk toward the sensor's mean over the
                day where an hour has few readings), so widths follow rush hours and the
                sensors that are hard to forecast
``cqr``         :math:`a, b` the quantile run's :math:`\alpha/2` and :math:`1 - \alpha/2`
                quantiles (the nearest it has), :math:`s = 1`: conformalised quantile
                regression (Romano, Patterson & Candès 2019)

Guarantee: when the calibration windows and a test window are exchangeable, each horizon's
interval covers with probability at least :math:`1 - \alpha` (and below
:math:`1 - \alpha + 1/(n_h + 1)` for continuous scores), whatever the model. Traffic is not
exchangeable over time: when the test period drifts from the calibration period the
guarantee is lost, which :mod:`gwnet.intervals.online` addresses. The difficulty
:math:`\sigma` is estimated on other windows (training) than those it calibrates on, so the
guarantee is kept.

Every interval holds the point forecast: :math:`l \le \hat y \le u`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..engine.metrics import valid_mask
from ..errors import GWNetError
from ..registry import INTERVALS

HOURS = 24
# Calibration scores kept per horizon; above it every batch is thinned (evenly) so memory stays
# bounded on the largest graphs. Millions of scores leave the quantile's error far below 1%.
MAX_SCORES = 4_000_000
# Pseudo-readings of the sensor's daily mean that shrink each (sensor, hour) difficulty.
SHRINK = 10.0


def target_hours(target_times: np.ndarray) -> torch.Tensor:
    """Hour of the day (0..23) of every target time ``(B, H)``."""
    times = np.asarray(target_times, dtype="datetime64[m]")
    minutes = (times - times.astype("datetime64[D]")).astype(np.int64)
    return torch.from_numpy(minutes // 60)


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score (``inf`` when that exceeds ``n``)."""
    n = scores.numel()
    k = math.ceil((n + 1) * (1 - alpha))
    if n == 0 or k > n:
        return math.inf
    return float(torch.kthvalue(scores.double().flatten(), max(k, 1)).values)


class IntervalMethod:
    """Base class: fit on calibration batches, then give ``(lower, upper)`` for any batch.

    A *batch* is anything with ``prediction`` ``(B, H, N)``, ``actual`` ``(B, H, N)`` (for
    fitting), ``target_times`` ``(B, H)`` and, for quantile runs, ``quantiles``
    ``(B, H, Q, N)`` and ``levels`` (a :class:`gwnet.ensemble.Forecast` is one).
    """

    name = ""
    description = ""
    needs_quantiles = False
    uses_training = False  # fit_difficulty() wants forecasts of the training split

    def __init__(self, level: float, horizon: int, null_value: float = 0.0, clamp_min: float = -math.inf):
        check_level(level)
        self.level, self.alpha, self.horizon = float(level), 1.0 - float(level), int(horizon)
        self.null_value, self.clamp_min = null_value, clamp_min
        self.q = torch.full((self.horizon,), math.nan, dtype=torch.float64)  # per-horizon widths
        self.calibration_size = np.zeros(self.horizon, dtype=np.int64)

    # --- what a method defines ------------------------------------------------------------
    def components(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, s)``, each ``(B, H, N)``: ``lower = a - q s``, ``upper = b + q s``."""
        raise NotImplementedError

    def fit_difficulty(self, batches: Iterable) -> None:
        """Estimate the difficulty from forecasts of other windows than the calibration ones."""

    # --- shared ---------------------------------------------------------------------------
    def scores(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Nonconformity scores ``(B, H, N)`` of a batch with readings, and their valid mask."""
        a, b, s = self.components(batch)
        y = batch.actual[:, :a.shape[1]].double()
        score = torch.maximum(a - y, y - b) / s
        return score, valid_mask(y, self.null_value)

    def fit(self, batches: Iterable, source: str = "the validation split") -> "IntervalMethod":
        """Set the per-horizon widths from the calibration batches' scores."""
        kept: list[list[torch.Tensor]] = [[] for _ in range(self.horizon)]
        stride = 1
        for batch in batches:
            score, mask = self.scores(batch)
            for h in range(min(self.horizon, score.shape[1])):
                values = score[:, h][mask[:, h]]
                kept[h].append(values[::stride])
            held = sum(t.numel() for t in kept[0])
            if held > MAX_SCORES:  # thin what is held and what comes, evenly
                stride *= 2
                kept = [[torch.cat(k)[::2]] for k in kept]
        for h in range(self.horizon):
            values = torch.cat(kept[h]) if kept[h] else torch.zeros(0, dtype=torch.float64)
            if values.numel() == 0:
                raise GWNetError(f"{source}: no valid readings at horizon {h + 1} to calibrate the intervals on")
            self.calibration_size[h] = values.numel() * stride
            self.q[h] = conformal_quantile(values, self.alpha)
        return self

    def bounds(self, batch, q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lower, upper)`` ``(B, H, N)`` float32 around ``batch.prediction``; ``q`` (``(H,)`` or
        ``(H, N)``) replaces the calibrated widths (the online update's)."""
        a, b, s = self.components(batch)
        width = self.q if q is None else torch.as_tensor(q, dtype=torch.float64)
        width = width[:a.shape[1]]
        width = width.view(1, -1, 1) if width.dim() == 1 else width.unsqueeze(0)
        pred = batch.prediction.double()
        lower = torch.minimum(a - width * s, pred).clamp(min=self.clamp_min)
        upper = torch.maximum(b + width * s, pred)
        return lower.float(), upper.float()

    def score_unit(self) -> torch.Tensor:
        """A typical size of the scores per horizon (the online update's step unit)."""
        unit = self.q.abs().clone()
        return torch.where(torch.isfinite(unit) & (unit > 0), unit, torch.ones_like(unit))

    def describe(self) -> str:
        return f"{self.level:.0%} intervals, {self.description}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "level": self.level, "horizon": self.horizon, "q": self.q.tolist()}


def check_level(level: Any) -> float:
    """``level`` as a float in (0, 1), else a one-line :class:`GWNetError`."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise GWNetError(f"interval level must be a number in (0, 1), e.g. 0.9; got {level!r}") from None
    if not 0 < value < 1:
        raise GWNetError(f"interval level must lie in (0, 1), e.g. 0.9 for 90% intervals; got {level!r}")
    return value


@INTERVALS.register("split")
class SplitConformal(IntervalMethod):
    """One symmetric width per horizon: the conformal quantile of ``|y - prediction|``."""

    name = "split"
    description = "split conformal, one width per horizon"

    def components(self, batch):
        pred = batch.prediction.double()
        return pred, pred, torch.ones_like(pred)


@INTERVALS.register("normalized")
class NormalizedConformal(IntervalMethod):
    """Widths proportional to the forecast's difficulty at that sensor, horizon and hour."""

    name = "normalized"
    description = "normalised conformal, width by sensor, horizon and hour of day"
    uses_training = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sigma: torch.Tensor | None = None  # (H, hours, N)

    def fit_difficulty(self, batches: Iterable) -> None:
        sums = counts = None
        for batch in batches:
            pred = batch.prediction.double()
            B, H, N = pred.shape
            y = batch.actual[:, :H].double()
            mask = valid_mask(y, self.null_value)
            err = torch.where(mask, (pred - y).abs(), 0.0)
            hour = target_hours(batch.target_times)[:, :H]  # (B, H)
            if sums is None:
                sums = torch.zeros(self.horizon, HOURS, N, dtype=torch.float64)
                counts = torch.zeros_like(sums)
            index = hour.unsqueeze(-1).expand(B, H, N)
            for h in range(H):
                sums[h].index_add_(0, index[:, h, 0], err[:, h])
                counts[h].index_add_(0, index[:, h, 0], mask[:, h].double())
        if sums is None or float(counts.sum()) == 0:
            self.sigma = None
            return
        # The sensor's mean over the day at that horizon, then the horizon's over all sensors.
        sensor = sums.sum(1) / counts.sum(1).clamp(min=1)  # (H, N)
        overall = sums.sum((1, 2)) / counts.sum((1, 2)).clamp(min=1)  # (H,)
        sensor = torch.where(counts.sum(1) > 0, sensor, overall[:, None])
        sigma = (sums + SHRINK * sensor[:, None, :]) / (counts + SHRINK)
        floor = 1e-3 * overall.clamp(min=1e-6)
        self.sigma = torch.maximum(sigma, floor[:, None, None])

    def components(self, batch):
        pred = batch.prediction.double()
        if self.sigma is None:
            return pred, pred, torch.ones_like(pred)
        H = pred.shape[1]
        hour = target_hours(batch.target_times)[:, :H]  # (B, H)
        horizons = torch.arange(H)[None, :].expand_as(hour)
        s = self.sigma[horizons, hour]  # (B, H, N)
        return pred, pred, s

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["difficulty"] = None if self.sigma is None else "sensor x horizon x hour of day (training split)"
        return out


@INTERVALS.register("cqr")
class ConformalizedQuantiles(IntervalMethod):
    """Conformalised quantile regression: the run's outer quantiles, widened (or narrowed) by
    the conformal quantile of ``max(lower - y, y - upper)``."""

    name = "cqr"
    description = "conformalised quantiles (CQR)"
    needs_quantiles = True

    def pair(self, levels: Sequence[float]) -> tuple[int, int]:
        """Positions of the quantiles used as the raw interval: the nearest levels to alpha/2
        and 1 - alpha/2 on the outside (the outermost ones if none is)."""
        levels = [float(q) for q in levels]
        low = [i for i, q in enumerate(levels) if q <= self.alpha / 2 + 1e-9]
        high = [i for i, q in enumerate(levels) if q >= 1 - self.alpha / 2 - 1e-9]
        return (low[-1] if low else 0), (high[0] if high else len(levels) - 1)

    def components(self, batch):
        if getattr(batch, "quantiles", None) is None:
            raise GWNetError("cqr intervals need quantile forecasts (gwnet-train --quantiles ...); "
                             "use the split or normalized method for point runs")
        lo, hi = self.pair(batch.levels)
        q = batch.quantiles.double()
        return q[:, :, lo], q[:, :, hi], torch.ones_like(q[:, :, lo])

    def score_unit(self) -> torch.Tensor:
        # CQR's correction may be near 0 (or negative): the step unit is the raw scores' spread.
        unit = getattr(self, "unit", None)
        return unit if unit is not None else super().score_unit()

    def fit(self, batches: Iterable, source: str = "the validation split") -> "IntervalMethod":
        spread = torch.zeros(self.horizon, dtype=torch.float64)
        count = torch.zeros(self.horizon, dtype=torch.float64)

        def seen(batches):
            for batch in batches:
                a, b, _ = self.components(batch)
                H = a.shape[1]
                mask = valid_mask(batch.actual[:, :H], self.null_value)
                spread[:H] += torch.where(mask, (b - a).abs(), 0.0).sum((0, 2))
                count[:H] += mask.sum((0, 2))
                yield batch

        super().fit(seen(batches), source)
        # Half the raw interval's mean width: how far a miss typically is, in real units.
        self.unit = (spread / count.clamp(min=1) / 2).clamp(min=1e-6)
        return self
