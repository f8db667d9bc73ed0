r"""Online adaptive conformal intervals: the widths follow the readings as they arrive.

Split conformal's guarantee needs the test period to behave like the calibration period.
Traffic drifts (a weekend after weekday calibration, an incident, a closure), so
:class:`OnlineConformal` keeps, per horizon and sensor, a width :math:`q_t` that it updates
each time a forecast's reading arrives (online quantile tracking, the form of adaptive
conformal inference of Gibbs & Candès 2021 that Angelopoulos, Candès & Tibshirani 2023 call
the quantile update):

.. math::
    q_{t+1} = q_t + \eta \, u_h \, (\mathrm{err}_t - \alpha), \qquad
    \mathrm{err}_t = [\,y_t \notin [l_t, u_t]\,],

where :math:`u_h` is the size of a typical calibration score at horizon :math:`h` (so
:math:`\eta` has no unit). A miss widens the next intervals by :math:`\eta u_h (1 - \alpha)`,
a hit narrows them by :math:`\eta u_h \alpha`. Guarantee, for *any* sequence of readings
(no exchangeability): the long-run miss rate at every horizon and sensor is within
:math:`(\max q - \min q + \eta u_h)/(\eta u_h T)` of :math:`\alpha` after :math:`T`
readings, so it converges to :math:`\alpha`. It says nothing about any single window: after
a sudden change the first intervals miss until the width has caught up (a larger
:math:`\eta` catches up faster and makes the widths noisier).

The state is small (a width per horizon and sensor, counters) and JSON-ready:
:meth:`OnlineConformal.to_dict` / :meth:`OnlineConformal.from_dict`. ``gwnet-predict
--latest --interval L`` keeps it, with the forecasts whose readings have not all arrived
yet, in ``intervals_state.json`` of its output directory.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import GWNetError

# Default step size: a miss widens by 18% of a typical score, a hit narrows by 2%. On the
# synthetic benchmark (experiments/intervals.py) 0.1 caught up too slowly after a shift
# (long-run coverage 0.86-0.89 for split conformal), 0.4 and above widened more than needed.
DEFAULT_STEP = 0.2


class OnlineConformal:
    """Adaptive widths for a stream of forecasts, ``horizon x sensors`` at a time.

    ``interval(forecast)`` gives ``(lower, upper)`` of a ``(H, N)`` forecast with the current
    widths (``scale``, ``(H, N)``, multiplies them: a normalised method's difficulty);
    ``update(forecast, lower, upper, truth)`` scores an issued interval once its readings are
    known (``truth`` ``(H, N)`` with NaN where a reading is unknown or missing: those are
    skipped, so a horizon can be updated as soon as its own reading arrives).

    ``width`` (``(H,)``): the calibrated starting widths; ``unit`` (``(H,)``, default
    ``width``): the step's unit per horizon.
    """

    def __init__(self, level: float, width, unit=None, step: float = DEFAULT_STEP, sensors: int | None = None):
        from .methods import check_level

        self.level = check_level(level)
        self.alpha = 1.0 - self.level
        if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
            raise GWNetError(f"online step must be a number above 0, got {step!r}")
        self.step = float(step)
        base = np.asarray(width, dtype=np.float64).reshape(-1)
        unit = base if unit is None else np.asarray(unit, dtype=np.float64).reshape(-1)
        self.unit = np.where(np.isfinite(unit) & (unit > 0), unit, 1.0)
        self.base = np.where(np.isfinite(base), base, 0.0)
        self.q: np.ndarray | None = None  # (H, N), made on first use
        self.seen = self.missed = None
        if sensors is not None:
            self._start(sensors)

    @property
    def horizon(self) -> int:
        return len(self.base)

    def _start(self, sensors: int) -> None:
        if self.q is None:
            self.q = np.repeat(self.base[:, None], sensors, axis=1)
            self.seen = np.zeros((self.horizon, sensors), dtype=np.int64)
            self.missed = np.zeros((self.horizon, sensors), dtype=np.int64)
        elif self.q.shape[1] != sensors:
            raise GWNetError(f"the online intervals follow {self.q.shape[1]} sensors, got {sensors}")

    def widths(self, sensors: int) -> np.ndarray:
        """The current widths ``(H, N)``."""
        self._start(sensors)
        return self.q.copy()

    def interval(self, forecast, scale=None) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` of a ``(H, N)`` forecast with the current widths."""
        f = np.asarray(forecast, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] > self.horizon:
            raise GWNetError(f"a forecast must be (horizons <= {self.horizon}, sensors), got {f.shape}")
        self._start(f.shape[1])
        half = self.q[:f.shape[0]] * (1.0 if scale is None else np.asarray(scale, dtype=np.float64))
        return f - np.maximum(half, 0.0), f + np.maximum(half, 0.0)

    def update(self, forecast, lower, upper, truth) -> int:
        """Score the issued ``[lower, upper]`` against ``truth`` (NaN: unknown); the number of
        readings used. ``forecast`` only fixes the shape (an interval need not be symmetric)."""
        lo, hi, y = (np.asarray(v, dtype=np.float64) for v in (lower, upper, truth))
        shape = np.shape(forecast)
        if not (lo.shape == hi.shape == y.shape == shape) or len(shape) != 2 or shape[0] > self.horizon:
            raise GWNetError(f"forecast, lower, upper and truth must all be (horizons <= {self.horizon}, "
                             f"sensors); got {shape}, {lo.shape}, {hi.shape} and {y.shape}")
        self._start(shape[1])
        known = np.isfinite(y)
        miss = known & ((y < lo) | (y > hi))
        H = shape[0]
        self.q[:H] += self.step * self.unit[:H, None] * np.where(known, miss - self.alpha, 0.0)
        self.seen[:H] += known
        self.missed[:H] += miss
        return int(known.sum())

    def coverage(self) -> float:
        """Share of the scored readings inside their intervals (NaN before any)."""
        seen = 0 if self.seen is None else int(self.seen.sum())
        return math.nan if seen == 0 else 1.0 - int(self.missed.sum()) / seen

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "step": self.step, "base": self.base.tolist(), "unit": self.unit.tolist(),
                "q": None if self.q is None else np.round(self.q, 6).tolist(),
                "seen": None if self.seen is None else self.seen.tolist(),
                "missed": None if self.missed is None else self.missed.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: str = "online state") -> "OnlineConformal":
        try:
            online = cls(state["level"], state["base"], state["unit"], state["step"])
            if state.get("q") is not None:
                online.q = np.asarray(state["q"], dtype=np.float64)
                online.seen = np.asarray(state["seen"], dtype=np.int64)
                online.missed = np.asarray(state["missed"], dtype=np.int64)
                if not (online.q.ndim == 2 and online.q.shape[0] == online.horizon
                        and online.q.shape == online.seen.shape == online.missed.shape
                        and np.isfinite(online.q).all()):
                    raise ValueError("inconsistent shapes")
        except GWNetError as exc:
            raise GWNetError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise GWNetError(f"{source}: not a saved online interval state ({exc})") from None
        return online
