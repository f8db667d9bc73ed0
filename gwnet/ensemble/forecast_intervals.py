"""``gwnet.predict_intervals``: forecasts with calibrated intervals in one Python call."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from .bands import Bands, IntervalOptions
from .combine import Ensemble
from .members import load_members
from .report import fit_on_validation, split_windows
from .tables import tidy


def predict_intervals(runs: str | Path | Sequence[str | Path], level: float = 0.9, split: str = "test",
                      method: str | None = None, strategy: str = "per-horizon", device: str = "cpu",
                      batch_size: int | None = None, **source: str | None) -> pd.DataFrame:
    """Forecasts of one run (or an ensemble of several) with intervals of coverage ``level``
    calibrated on the validation split, as one table: ``origin_time, target_time, sensor_id,
    horizon, prediction, lower, upper, actual`` (``actual`` empty where unknown).

    ``split``: ``test``, ``val``, ``all`` or ``latest`` (the horizons after the last readings).
    ``method``: a name in :data:`gwnet.registry.INTERVALS` (default: ``cqr`` for quantile runs,
    ``normalized`` otherwise). ``source`` replaces the data as ``gwnet-predict`` does
    (``dataset=``, ``data=``, ``adj=``, ``key=``). The whole table is held in memory; for
    large graphs and long splits ``gwnet-predict --interval`` streams it to a file instead.

    >>> table = gwnet.predict_intervals("runs/improved", level=0.9)  # doctest: +SKIP
    """
    paths = [runs] if isinstance(runs, (str, Path)) else list(runs)
    options = IntervalOptions(level, method)
    members, data = load_members(paths, device, **source)
    ensemble = Ensemble(members, strategy)
    batch_size = batch_size or members[0].config.train.batch_size
    fit_on_validation(ensemble, data, batch_size)
    bands = Bands(ensemble, data, options, batch_size)
    if split == "latest":
        forecasts = [ensemble.predict_latest(data)]
        for forecast in forecasts:
            forecast.lower, forecast.upper = bands.method.bounds(forecast)
    else:
        forecasts = bands.apply(ensemble.predict(split_windows(data, split), batch_size))
    return pd.concat([tidy(f, data.sensor_ids, ensemble.null_value) for f in forecasts], ignore_index=True)
