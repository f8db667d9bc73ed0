"""The model (or ensemble) a server holds, loaded once, and its forecast from a window.

Loading follows ``gwnet-predict --latest`` step for step: the members are the runs' best
models, checked to read the same windows; a strategy fitted on validation (``per-horizon``
or ``weighted`` with several members) is fitted once at start on the validation split of
the runs' data (or the data given); one member under ``per-horizon`` is that member. A
forecast builds the same input :meth:`gwnet.data.TrafficData.latest` builds from a readings
file (readings, calendar features of their times, the member's scaling) and combines the
members as :meth:`gwnet.ensemble.Ensemble.predict_latest` does, so a served forecast is the
one ``gwnet-predict --latest`` writes for the same readings.

Intervals: with ``interval`` (:class:`gwnet.ensemble.bands.IntervalOptions`) the forecaster
calibrates them at start as ``gwnet-predict --interval`` does and adapts them online
(:mod:`gwnet.serve.intervals`). Any object with ``interval(forecast, readings, update) ->
(lower, upper)`` (arrays shaped as the forecast's ``(1, H, N)`` prediction; ``update`` false:
keep no state from these readings) set as
:attr:`Forecaster.calibrator` does the same job.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.datasets import TrafficData
from ..data.graph import SensorGraph
from ..data.windows import build_series
from ..ensemble import STRATEGIES, Ensemble, Forecast, load_member, load_members, member_names
from ..ensemble.members import check_compatible
from ..ensemble.report import fit_on_validation
from ..errors import file_error


class Calibrator(Protocol):
    def interval(self, forecast: Forecast, readings: pd.DataFrame,
                 update: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


class Forecaster:
    """Members combined by ``strategy``; :meth:`forecast` of a window of readings."""

    def __init__(self, runs: Sequence[str | Path], strategy: str = "per-horizon", device: str = "cpu",
                 batch_size: int | None = None, interval=None, interval_state: str | Path | None = None,
                 **source: str | None):
        for path in runs:
            if Path(path).is_file():
                raise file_error(path, "is a checkpoint file; gwnet-serve takes run directories (gwnet-train --out)")
        fitted = len(runs) > 1 and STRATEGIES.get_entry(strategy).needs_validation
        self.calibrator: Calibrator | None = None
        if fitted or interval is not None:  # both need the validation split of the runs' data
            members, data = load_members(runs, device, latest=False, **source)
            batch_size = batch_size or members[0].config.train.batch_size
            self.ensemble = Ensemble(members, strategy)
            fit_on_validation(self.ensemble, data, batch_size)  # as gwnet-predict fits it
            if interval is not None:
                from ..ensemble.bands import Bands
                from .intervals import OnlineIntervals

                self.calibrator = OnlineIntervals(Bands(self.ensemble, data, interval, batch_size),
                                                  members[0].config.train.null_value, interval_state)
        else:
            names = dict(zip(map(str, runs), member_names(runs)))
            members = [load_member(p, device, names[str(p)]) for p in runs]
            check_compatible(members)
            self.ensemble = Ensemble(members, strategy)
            if not self.ensemble.fitted:
                self.ensemble.fit_without_validation(str(runs[0]))
        self.members = members
        first = members[0]
        self.sensor_ids = list(first.sensor_ids)
        self.config = first.config.data
        self.null_value = first.config.train.null_value
        self.seq_len = self.config.seq_len
        self.step_minutes = self.config.step_minutes or 5
        self.strategy = strategy
        self.runs = [str(p) for p in runs]
        # Only the sensor ids of the graph are read when forecasting; each member holds its own supports.
        self._graph = SensorGraph(self.sensor_ids, np.zeros((0, 0), dtype=np.float32))

    @property
    def horizon(self) -> int:
        return self.ensemble.horizon

    @property
    def minutes_ahead(self) -> list[int]:
        return [int(m) for m in self.ensemble.lead_minutes]

    def forecast(self, readings: pd.DataFrame,
                 update: bool = True) -> tuple[Forecast, tuple[np.ndarray, np.ndarray] | None]:
        """The forecast after the last ``seq_len`` rows of ``readings`` (time x the model's
        sensors, ``null_value`` where missing), and the interval when a calibrator is set.
        ``update=False`` (a stateless forecast) leaves the calibrator's online state as it is."""
        cfg = dataclasses.replace(self.config, step_minutes=self.step_minutes)
        data = TrafficData(readings, self._graph, cfg, build_series(readings, cfg), {}, self.members[0].scaler,
                           "readings")
        with torch.no_grad():
            result = self.ensemble.predict_latest(data)
        band = self.calibrator.interval(result, readings, update=update) if self.calibrator is not None else None
        if band is not None:
            shape = result.prediction.shape
            result.lower, result.upper = (torch.as_tensor(np.asarray(b, dtype=np.float32)).reshape(shape)
                                          for b in band)
        return result, band

    def metadata(self) -> dict:
        c = self.config
        return {"sensor_ids": self.sensor_ids, "num_sensors": len(self.sensor_ids), "seq_len": self.seq_len,
                "horizon": self.horizon, "step_minutes": self.step_minutes, "minutes_ahead": self.minutes_ahead,
                "unit": c.unit, "target": c.target, "protocol": c.protocol, "null_value": self.null_value,
                "strategy": self.strategy,
                "intervals": self.calibrator.describe() if hasattr(self.calibrator, "describe") else
                self.calibrator is not None,
                "members": [{"name": m.name, "model": m.config.arch, "horizon": m.horizon} for m in self.members]}
