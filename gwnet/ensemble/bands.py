"""Intervals in a prediction report: calibrate for the ensemble (or the single run), put
``lower``/``upper`` on every forecast batch, score them, and keep ``--latest``'s online state."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from ..data import TrafficData
from ..intervals import IntervalAccumulator, calibrate, check_level, start_online
from ..intervals.calibrate import STATE_FILE, advance_online, load_state
from ..intervals.methods import IntervalMethod
from ..intervals.online import DEFAULT_STEP, OnlineConformal
from .combine import Ensemble, Forecast
from .members import ENSEMBLE


@dataclass
class IntervalOptions:
    """What ``gwnet-predict --interval`` asks for."""

    level: float
    method: str | None = None  # None: cqr for quantile forecasts, else normalized
    online_step: float = DEFAULT_STEP  # the --latest online update's step size

    def __post_init__(self):
        self.level = check_level(self.level)


class Bands:
    """A fitted interval method for ``ensemble`` and the metrics of what it issued."""

    def __init__(self, ensemble: Ensemble, data: TrafficData, options: IntervalOptions, batch_size: int = 64):
        self.ensemble, self.options = ensemble, options
        self.method: IntervalMethod = calibrate(ensemble, data, options.level, options.method, batch_size)
        # The model the intervals belong to: the ensemble, or the one run.
        self.model = ENSEMBLE if len(ensemble.members) > 1 else ensemble.members[0].name
        self.scores = IntervalAccumulator(ensemble.horizon, options.level, ensemble.null_value)
        self.online: OnlineConformal | None = None
        self.online_readings = 0

    def apply(self, batches: Iterable[Forecast]) -> Iterator[Forecast]:
        """Each batch with ``lower`` and ``upper`` set, scored where it has readings."""
        for batch in batches:
            batch.lower, batch.upper = self.method.bounds(batch)
            if batch.actual is not None:
                self.scores.update(batch.prediction, batch.lower, batch.upper, batch.actual,
                                   batch.quantiles, batch.levels)
            yield batch

    def metrics(self) -> pd.DataFrame:
        """``model, horizon`` and the interval metrics (see :mod:`gwnet.intervals.metrics`)."""
        return self.scores.per_horizon().reset_index().assign(model=self.model)

    def merge(self, metrics: pd.DataFrame) -> pd.DataFrame:
        """``metrics`` (of every model) with the interval columns, filled for :attr:`model` only."""
        return metrics.merge(self.metrics(), on=["model", "horizon"], how="left")

    def latest(self, forecast: Forecast, data: TrafficData, previous: Path | None, out: Path) -> Path:
        """Intervals for the latest forecast with the online widths: the state of the earlier call
        (``previous``, the state file of the result being replaced) is first updated with the
        readings that have arrived since, then this forecast joins its pending ones; the new
        state is written to ``out``. Returns the state file's path."""
        online, pending = load_state(previous, self.method) if previous is not None else (None, [])
        if online is None:
            online, pending = start_online(self.method, self.options.online_step), []
        path = Path(out) / STATE_FILE
        _, self.online_readings = advance_online(self.method, online, pending, forecast, data.speeds,
                                                 self.ensemble.null_value, path)
        self.online = online
        return path

    def describe(self) -> str:
        return self.method.describe()


def plot_calibration(bands: Bands, path: str | Path, lead_minutes) -> Path:
    """Nominal against empirical coverage by horizon; for quantile forecasts also each raw
    quantile's hit rate against its level (on the diagonal when calibrated)."""
    from matplotlib.figure import Figure

    from .plots import _save

    table = bands.scores.per_horizon()
    hits = bands.scores.quantile_hit_rates()
    fig = Figure(figsize=(10 if hits is not None else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if hits is not None else 1, squeeze=False)[0]
    ax = axes[0]
    x = [lead_minutes[h - 1] for h in table.index]
    ax.plot(x, table["coverage"], marker="o", label=f"{bands.model}: empirical")
    ax.axhline(bands.options.level, color="black", ls="--", lw=1, label=f"nominal {bands.options.level:.0%}")
    ax.set(xlabel="minutes ahead", ylabel="coverage", title=bands.describe(),
           ylim=(min(0.5, float(table["coverage"].min()) - 0.05), 1.0))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if hits is not None:
        ax = axes[1]
        ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1, label="calibrated")
        ax.plot(hits.index, hits.to_numpy(), marker="o", label="raw quantiles (all horizons)")
        ax.set(xlabel="quantile level", ylabel="share of readings at or below", title="quantile hit rates",
               xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))
