"""One call: predict a split (or the latest window) into an output directory."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..atomic import atomic_directory, atomic_path, atomic_write_text
from ..data import TrafficData, Windows
from ..engine.metrics import MetricAccumulator
from ..errors import GWNetError, file_error
from .combine import Ensemble
from .members import ENSEMBLE
from .plots import DAY, SensorTrace, plot_adaptive_adjacency, plot_mae_by_horizon, plot_sensors
from .tables import FORMATS, PredictionWriter, _pyarrow, metrics_frame, write_predictions

SPLITS = ("test", "val", "all", "latest")
# The most sensors one sensors.png shows (one panel each).
MAX_PLOTTED_SENSORS = 12
# Every file run() may write: an output directory holding anything else is never replaced.
OUTPUT_FILES = (*(f"predictions.{fmt}" for fmt in FORMATS), "metrics.csv", "ensemble.csv", "ensemble.json",
                "mae_by_horizon.png", "sensors.png", "adaptive_adjacency.png")


@dataclass
class Report:
    """What :func:`run` wrote."""

    out: Path
    predictions: Path
    rows: int
    metrics: pd.DataFrame | None  # None for the latest window (no actuals)
    files: list[Path]


def quantity_label(data: TrafficData) -> str:
    """``flow (vehicles/5 min)``: the target and its unit, for axes and tables."""
    c = data.config
    return f"{c.target or 'speed'}" + (f" ({c.unit})" if c.unit else "")


def unit_label(data: TrafficData) -> str:
    """``mph``, or the target when the data names no unit: what MAE and RMSE are measured in."""
    c = data.config
    return c.unit or c.target or ""


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
        overwrite: bool = False) -> Report:
    """Fit ``ensemble`` on ``data``'s validation split if its strategy needs it, forecast
    ``split`` (or the ``latest`` window) and write the output directory described above.

    ``out`` must be new or empty, or hold an earlier result and ``overwrite`` be given (a
    directory with other files is never replaced). The whole result is written beside it and
    then takes its place (:func:`gwnet.atomic.atomic_directory`): a failure or a kill leaves
    the earlier result whole, never a mix of two."""
    out = Path(out)
    with atomic_directory(out, overwrite, OUTPUT_FILES, "gwnet-predict") as stage:
        report = _write(ensemble, data, stage, split, fmt, sensors, batch_size, plots)

    def moved(path: Path) -> Path:
        return out / path.relative_to(stage)

    return Report(out, moved(report.predictions), report.rows, report.metrics, [moved(p) for p in report.files])


def _write(ensemble: Ensemble, data: TrafficData, out: Path, split: str, fmt: str,
           sensors: Sequence[str] | None, batch_size: int, plots: bool) -> Report:
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
    if not ensemble.fitted:
        if "val" in data.windows:
            ensemble.fit(split_windows(data, "val"), batch_size, source=data.source)
        else:  # only the last readings (--latest): nothing to fit on
            ensemble.fit_without_validation(data.source)
    files = [path]
    if windows is None:
        rows, metrics, (history, traces) = _forecast_latest(ensemble, data, path, index)
    else:
        rows, metrics, (history, traces) = _forecast_windows(ensemble, data, windows, path, index, batch_size)
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
                                             unit_label(data)))
        files.append(plot_sensors(history, traces, out / "sensors.png", quantity_label(data)))
        adjacency = plot_adaptive_adjacency(ensemble.members, data.sensor_ids, out / "adaptive_adjacency.png")
        if adjacency is not None:
            files.append(adjacency)
    return Report(out, path, rows, metrics, files)


Traces = tuple[pd.DataFrame, dict[str, pd.DataFrame]]  # readings, and forecasts by label


def _forecast_windows(ensemble: Ensemble, data: TrafficData, windows: Windows, path: Path,
                      index: list[int], batch_size: int) -> tuple[int, pd.DataFrame, Traces]:
    """One streaming pass: write the table, score members and ensemble, keep the plotted day."""
    scores = {m.name: MetricAccumulator(m.horizon, ensemble.null_value) for m in ensemble.members}
    scores[ENSEMBLE] = MetricAccumulator(ensemble.horizon, ensemble.null_value)
    trace = SensorTrace(index, ensemble.horizon, DAY // ensemble.step)
    with PredictionWriter(path, data.sensor_ids, ensemble.null_value) as writer:
        for batch in ensemble.predict(windows, batch_size):
            writer.write(batch)
            trace.update(batch)
            for acc, pred in zip(scores.values(), batch.members + [batch.prediction]):
                acc.update(pred, batch.actual[:, :pred.shape[1]])
    traces = trace.frames(data.sensor_ids, ensemble.lead_minutes, ensemble.null_value)
    return writer.rows, metrics_frame(scores), traces


def _forecast_latest(ensemble: Ensemble, data: TrafficData, path: Path,
                     index: list[int]) -> tuple[int, None, Traces]:
    """The forecast after the last readings; the plot shows the day of readings before it."""
    forecast = ensemble.predict_latest(data)
    rows = write_predictions(iter([forecast]), path, data.sensor_ids, ensemble.null_value)
    history = data.speeds.iloc[-(DAY // ensemble.step):, index].replace(ensemble.null_value, np.nan)
    future = pd.DataFrame(forecast.prediction[0][:, index].numpy(), index=forecast.target_times[0],
                          columns=history.columns)
    return rows, None, (history, {"forecast": future})
