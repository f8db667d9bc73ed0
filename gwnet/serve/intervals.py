"""Calibrated intervals for served forecasts, adapting online as the readings arrive.

At start the interval method is fitted on the validation split of the runs' data, exactly as
``gwnet-predict --interval LEVEL`` fits it (:class:`gwnet.ensemble.bands.Bands`). Each
forecast then gets ``lower``/``upper`` with the online widths of that moment, and joins the
forecasts waiting for their readings; every forecast of the held window (``GET /forecast``)
first scores the waiting ones against the readings the window now holds, which moves the widths
(:mod:`gwnet.intervals.online`). A reading is scored if a forecast is made while it is still in
the window (``seq_len`` steps). ``POST /forecast`` (readings a client made up, perhaps) gets the
widths as they stand and changes nothing.
The online state is kept beside the window's state file (``--state`` + ``.intervals.json``),
so a restart continues it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..ensemble.bands import Bands
from ..ensemble.combine import Forecast
from ..intervals.calibrate import advance_online, load_state
from ..intervals import start_online


class OnlineIntervals:
    """``interval(forecast, readings, update)`` for :class:`gwnet.serve.Forecaster`'s calibrator hook."""

    def __init__(self, bands: Bands, null_value: float, state: str | Path | None = None):
        self.method, self.null_value = bands.method, null_value
        self.level = bands.options.level
        self.state = Path(state) if state is not None else None
        online, pending = load_state(self.state, self.method) if self.state is not None else (None, [])
        if online is None:
            online, pending = start_online(self.method, bands.options.online_step), []
        self.online, self.pending = online, pending
        self.scored = 0

    def interval(self, forecast: Forecast, readings: pd.DataFrame,
                 update: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Bounds with the online widths of this moment; with ``update`` (the held window's
        forecasts only) the waiting forecasts are scored first and this one joins them."""
        self.pending, used = advance_online(self.method, self.online, self.pending, forecast, readings,
                                            self.null_value, self.state, update=update)
        self.scored += used
        return forecast.lower.numpy(), forecast.upper.numpy()

    def describe(self) -> dict:
        return {"level": self.level, "method": self.method.describe(), "online_readings_scored": self.scored}
