"""One call: predict a split (or the latest window) into an output directory."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..atomic import atomic_directory, atomic_path, atomic_write_text
from ..data import TrafficData, Windows
from ..engine.baselines import baseline_tables
from ..engine.metrics import MetricAccumulator
from ..errors import GWNetError, file_error
from ..intervals.calibrate import STATE_FILE
from .bands import Bands, IntervalOptions, plot_calibration
from .combine import Ensemble
from .members import ENSEMBLE
from .plots import DAY, SensorTrace, plot_adaptive_adjacency, plot_mae_by_horizon, plot_sensors, with_band
from .tables import FORMATS, PredictionWriter, _pyarrow, metrics_frame, write_predictions

SPLITS = ("test", "val", "all", "latest")
# The most sensors one sensors.png shows (one panel each).
MAX_PLOTTED_SENSORS = 12
# Every file run() may write: an output directory holding anything else is never replaced.
OUTPUT_FILES = (*(f"predictions.{fmt}" for fmt in FORMATS), "metrics.csv", "ensemble.csv", "ensemble.json",
                "mae_by_horizon.png", "sensors.png", "adaptive_adjacency.png",
                # with --interval: the calibration plot, and --latest's online interval state
                "calibration.png", "intervals_state.json")


@dataclass
class Report:
    """What :func:`run` wrote."""

    out: Path
    predictions: Path
    rows: int
    metrics: pd.DataFrame | None  # None for the latest window (no actuals)
    files: list[Path]
    # Baselines' tables (rows: horizons and mean) on the split, by label; empty for latest/all.
    baselines: dict[str, pd.DataFrame] = field(default_factory=dict)
    # The calibrated intervals (gwnet.ensemble.bands.Bands) when run() was asked for them.
    bands: object | None = None


def quantity_label(data: TrafficData) -> str:
    """``flow (vehicles/5 min)``: the target and its unit, for axes and tables."""
    c = data.config
    return f"{c.target or 'speed'}" + (f" ({c.unit})" if c.unit else " (unit not given: --unit)")


def unit_label(data: TrafficData) -> str:
    """``mph``, or the target when the data names no unit: what MAE and RMSE are measured in."""
    c = data.config
    return c.unit or (f"{c.target}; unit not given: --unit" if c.target else "")


def split_windows(data: TrafficData, split: str) -> Windows:
    """The windows of ``split``; ``all`` spans train, validation and test."""
    if not {"train", "test", split} <= {*data.windows, "all"}:
        raise file_error(data.source, f"holds only the last readings, no {split} split; use --latest")
    if split == "all":
        first, last = data.windows["train"], data.windows["test"]
        windows = Windows(first.series, first.scaler, first.start, last.stop, first.seq_len,
                          first.horizon, first.first_offset, first.index)
    else:
        windows = data.windows[split]
    if len(windows) == 0:
        raise file_error(data.source, f"the {split} split holds no windows")
    return windows


def fit_on_validation(ensemble: Ensemble, data: TrafficData, batch_size: int) -> Ensemble:
    """Fit ``ensemble`` on ``data``'s validation windows when its strategy needs fitting: how
    gwnet-predict, gwnet-serve, the intervals and the teachers of a distillation all fit it."""
    if not ensemble.fitted:
        ensemble.fit(split_windows(data, "val"), batch_size, source=data.source)
    return ensemble


def sensor_positions(data: TrafficData, sensors: Sequence[str] | None) -> list[int]:
    """Column positions of ``sensors`` (default: the first three), each once, at most
    :data:`MAX_PLOTTED_SENSORS` of them (a warning says what was left out)."""
    ids = data.sensor_ids
    if not sensors:
        return list(range(min(3, len(ids))))
    where = {s: i for i, s in enumerate(ids)}
    unknown = [s for s in sensors if s not in where]
    if unknown:
        raise file_error(data.source, f"no sensor {unknown[0]!r} (it has {len(ids)} sensors, e.g. "
                         f"{', '.join(ids[:3])})")
    unique = list(dict.fromkeys(sensors))
    if len(unique) < len(sensors):
        warnings.warn(f"--sensors names {len(sensors) - len(unique)} sensor(s) more than once; each is "
                      "plotted once", stacklevel=2)
    if len(unique) > MAX_PLOTTED_SENSORS:
        warnings.warn(f"--sensors names {len(unique)} sensors; only the first {MAX_PLOTTED_SENSORS} are "
                      "plotted", stacklevel=2)
        unique = unique[:MAX_PLOTTED_SENSORS]
    return [where[s] for s in unique]


def run(ensemble: Ensemble, data: TrafficData, out: str | Path, split: str = "test", fmt: str = "csv",
        sensors: Sequence[str] | None = None, batch_size: int = 64, plots: bool = True,
        overwrite: bool = False, interval: IntervalOptions | None = None) -> Report:
    """Fit ``ensemble`` on ``data``'s validation split if its strategy needs it, forecast
    ``split`` (or the ``latest`` window) and write the output directory described above.

    ``out`` must be new or empty, or hold an earlier result and ``overwrite`` be given (a
    directory with other files is never replaced). The whole result is written beside it and
    then takes its place (:func:`gwnet.atomic.atomic_directory`): a failure or a kill leaves
    the earlier result whole, never a mix of two.

    ``interval``: calibrated intervals (``lower``/``upper`` columns, interval metrics, bands in
    the plots; see :mod:`gwnet.ensemble.bands`). For ``latest`` their online state continues
    from the one the earlier result in ``out`` holds."""
    out = Path(out)
    with atomic_directory(out, overwrite, OUTPUT_FILES, "gwnet-predict") as stage:
        report = _write(ensemble, data, stage, split, fmt, sensors, batch_size, plots, interval,
                        out / STATE_FILE)

    def moved(path: Path) -> Path:
        return out / path.relative_to(stage)

    return Report(out, moved(report.predictions), report.rows, report.metrics, [moved(p) for p in report.files],
                  report.baselines, report.bands)


def _write(ensemble: Ensemble, data: TrafficData, out: Path, split: str, fmt: str,
           sensors: Sequence[str] | None, batch_size: int, plots: bool,
           interval: IntervalOptions | None = None, previous: Path | None = None) -> Report:
    """What :func:`run` does, into the fresh directory ``out``."""
    if split not in SPLITS:
        raise GWNetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if fmt not in FORMATS:
        raise GWNetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    path = out / f"predictions.{fmt}"
    if fmt == "parquet":
        _pyarrow(path)  # fail before the work, not after it
    index = sensor_positions(data, sensors)
    windows = None if split == "latest" else split_windows(data, split)
    if not ensemble.fitted and "val" not in data.windows:  # only the last readings (--latest)
        ensemble.fit_without_validation(data.source)
    fit_on_validation(ensemble, data, batch_size)
    bands = Bands(ensemble, data, interval, batch_size) if interval is not None else None
    files = [path]
    # The baselines every model should beat, in the MAE plot and in the command's table.
    baselines = baseline_tables(data, split, ensemble.null_value) if split in ("test", "val") else {}
    if windows is None:
        rows, metrics, (history, traces) = _forecast_latest(ensemble, data, path, index, bands, previous)
        if bands is not None:
            files.append(out / STATE_FILE)
    else:
        rows, metrics, (history, traces) = _forecast_windows(ensemble, data, windows, path, index, batch_size,
                                                             bands)
        with atomic_path(out / "metrics.csv") as tmp:
            metrics.to_csv(tmp, index=False)
        files.append(out / "metrics.csv")
    with atomic_path(out / "ensemble.csv") as tmp:
        ensemble.selection().to_csv(tmp, index=False)
    atomic_write_text(out / "ensemble.json", json.dumps(ensemble.describe(), indent=2) + "\n")
    files += [out / "ensemble.csv", out / "ensemble.json"]
    if plots:
        if metrics is not None:
            shown = metrics if len(ensemble.members) > 1 else metrics[metrics["model"] != ENSEMBLE]
            files.append(plot_mae_by_horizon(shown, out / "mae_by_horizon.png", ensemble.lead_minutes,
                                             unit_label(data), baselines))
        files.append(plot_sensors(history, traces, out / "sensors.png", quantity_label(data)))
        adjacency = plot_adaptive_adjacency(ensemble.members, data.sensor_ids, out / "adaptive_adjacency.png")
        if adjacency is not None:
            files.append(adjacency)
        if bands is not None and metrics is not None:
            files.append(plot_calibration(bands, out / "calibration.png", ensemble.lead_minutes))
    return Report(out, path, rows, metrics, files, baselines, bands)


Traces = tuple[pd.DataFrame, dict[str, pd.DataFrame]]  # readings, and forecasts by label


def _forecast_windows(ensemble: Ensemble, data: TrafficData, windows: Windows, path: Path,
                      index: list[int], batch_size: int, bands: Bands | None = None) -> tuple[int, pd.DataFrame, Traces]:
    """One streaming pass: write the table, score members and ensemble (and the intervals),
    keep the plotted day."""
    scores = {m.name: MetricAccumulator(m.horizon, ensemble.null_value) for m in ensemble.members}
    scores[ENSEMBLE] = MetricAccumulator(ensemble.horizon, ensemble.null_value)
    trace = SensorTrace(index, ensemble.horizon, DAY // ensemble.step)
    batches = ensemble.predict(windows, batch_size)
    if bands is not None:
        batches = bands.apply(batches)
    with PredictionWriter(path, data.sensor_ids, ensemble.null_value, bands is not None) as writer:
        for batch in batches:
            writer.write(batch)
            trace.update(batch)
            for acc, pred in zip(scores.values(), batch.members + [batch.prediction]):
                acc.update(pred, batch.actual[:, :pred.shape[1]])
    traces = trace.frames(data.sensor_ids, ensemble.lead_minutes, ensemble.null_value)
    metrics = metrics_frame(scores)
    return writer.rows, metrics if bands is None else bands.merge(metrics), traces


def _forecast_latest(ensemble: Ensemble, data: TrafficData, path: Path, index: list[int],
                     bands: Bands | None = None, previous: Path | None = None) -> tuple[int, None, Traces]:
    """The forecast after the last readings; the plot shows the day of readings before it.
    With ``bands``, its intervals use the online widths, whose state moves on from
    ``previous`` (the earlier result's) into ``path``'s directory."""
    forecast = ensemble.predict_latest(data)
    if bands is not None:
        bands.latest(forecast, data, previous, path.parent)
    rows = write_predictions(iter([forecast]), path, data.sensor_ids, ensemble.null_value, bands is not None)
    history = data.speeds.iloc[-(DAY // ensemble.step):, index].replace(ensemble.null_value, np.nan)
    future = pd.DataFrame(forecast.prediction[0][:, index].numpy(), index=forecast.target_times[0],
                          columns=history.columns)
    if forecast.lower is not None:
        with_band(future, forecast.lower[0][:, index].numpy(), forecast.upper[0][:, index].numpy())
    return rows, None, (history, {"forecast": future})
