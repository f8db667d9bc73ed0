"""The prediction table (CSV or Parquet, streamed batch by batch) and the metrics table."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..atomic import atomic_path
from ..engine.metrics import MetricAccumulator, valid_mask
from ..errors import file_error
from .combine import Forecast

FORMATS = ("csv", "parquet")
COLUMNS = ("origin_time", "target_time", "sensor_id", "horizon", "prediction", "actual")


def table_format(path: str | Path) -> str:
    """``csv`` or ``parquet``, from the file name."""
    ext = Path(path).suffix.lower()
    if ext == ".csv":
        return "csv"
    if ext in (".parquet", ".pq"):
        return "parquet"
    raise file_error(path, "predictions must be written as .csv or .parquet")


def tidy(forecast: Forecast, sensor_ids: Sequence[str], null_value: float = 0.0) -> pd.DataFrame:
    """The long table of one batch: one row per origin, horizon and sensor (in that order)."""
    B, H, N = forecast.prediction.shape
    if forecast.actual is None:
        actual = np.full((B, H, N), np.nan, dtype=np.float32)
    else:
        y = forecast.actual[:, :H]
        actual = torch.where(valid_mask(y, null_value), y, torch.nan).numpy().astype(np.float32)
    frame = pd.DataFrame({
        "origin_time": np.repeat(forecast.origins.to_numpy(), H * N),
        "target_time": np.repeat(forecast.target_times.ravel(), N),
        "sensor_id": pd.Categorical.from_codes(np.tile(np.arange(N), B * H), categories=list(sensor_ids)),
        "horizon": np.tile(np.repeat(np.arange(1, H + 1, dtype=np.int32), N), B),
        "prediction": forecast.prediction.numpy().astype(np.float32).ravel(),
        "actual": actual.ravel(),
    })
    if forecast.lower is not None:  # calibrated intervals (gwnet-predict --interval)
        frame.insert(5, "lower", forecast.lower.numpy().astype(np.float32).ravel())
        frame.insert(6, "upper", forecast.upper.numpy().astype(np.float32).ravel())
    return frame


class PredictionWriter:
    """Writes the tidy table batch by batch to a temporary file, renamed into place on success.

    The format follows the extension: ``.csv`` (empty field for unknown actuals) or
    ``.parquet`` (one row group per batch; unknown actuals are nulls).
    """

    def __init__(self, path: str | Path, sensor_ids: Sequence[str], null_value: float = 0.0,
                 intervals: bool = False):
        self.intervals = intervals  # lower and upper columns after prediction
        self.path = Path(path)
        self.format = table_format(self.path)
        self.sensor_ids = list(sensor_ids)
        self.null_value = null_value
        self.rows = 0

    def __enter__(self) -> "PredictionWriter":
        self._stack = contextlib.ExitStack()
        if self.format == "parquet":
            pa, pq = _pyarrow(self.path)
            self._schema = pa.schema([
                ("origin_time", pa.timestamp("ns")), ("target_time", pa.timestamp("ns")),
                ("sensor_id", pa.dictionary(pa.int32(), pa.string())), ("horizon", pa.int32()),
                ("prediction", pa.float32()),
                *([("lower", pa.float32()), ("upper", pa.float32())] if self.intervals else []),
                ("actual", pa.float32())])
            self._from_pandas = pa.Table.from_pandas
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._out = self._stack.enter_context(
            pq.ParquetWriter(tmp, self._schema) if self.format == "parquet" else open(tmp, "w", newline=""))
        return self

    def write(self, forecast: Forecast) -> None:
        frame = tidy(forecast, self.sensor_ids, self.null_value)
        if self.format == "parquet":
            self._out.write_table(self._from_pandas(frame, schema=self._schema, preserve_index=False))
        else:
            frame.to_csv(self._out, header=self.rows == 0, index=False, na_rep="")
        self.rows += len(frame)

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise file_error(path, "writing Parquet needs pyarrow (pip install gwnet[parquet])") from None
    return pyarrow, pyarrow.parquet


def write_predictions(forecasts: Iterator[Forecast], path: str | Path, sensor_ids: Sequence[str],
                      null_value: float = 0.0, intervals: bool = False) -> int:
    """Stream ``forecasts`` into ``path`` (``.csv`` or ``.parquet``); the number of rows."""
    with PredictionWriter(path, sensor_ids, null_value, intervals) as writer:
        for batch in forecasts:
            writer.write(batch)
    return writer.rows


def metrics_frame(scores: dict[str, MetricAccumulator]) -> pd.DataFrame:
    """Long table ``model, horizon, mae, rmse, mape_pct`` (MAPE in %)."""
    parts = [acc.per_horizon().reset_index().assign(model=name) for name, acc in scores.items()]
    return pd.concat(parts, ignore_index=True)[["model", "horizon", "mae", "rmse", "mape_pct"]]
