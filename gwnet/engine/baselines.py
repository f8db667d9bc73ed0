"""Reference forecasters every model should beat: last value and historical average.

Both predict in real units from the raw (unscaled) windows and are scored with the same
masked metrics as the models, so their numbers sit in the same tables.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import TrafficData
from ..data.scaler import StandardScaler
from .metrics import MetricAccumulator

RAW = StandardScaler(mean=0.0, std=1.0)  # leaves readings as they are


def last_value(x_raw: torch.Tensor, horizon: int, fallback: float) -> torch.Tensor:
    """Repeat each sensor's last non-missing input reading over ``horizon`` steps.

    ``x_raw`` is ``(B, seq_len, N, F)``; a sensor with no reading in the window gets ``fallback``.
    """
    speed = x_raw[..., 0]
    present = speed != 0
    steps = torch.arange(1, speed.shape[1] + 1).view(1, -1, 1)
    last = (present * steps).argmax(dim=1, keepdim=True)
    value = speed.gather(1, last).squeeze(1)
    value = torch.where(present.any(dim=1), value, torch.full_like(value, fallback))
    return value.unsqueeze(1).expand(-1, horizon, -1)


def _slots(times: np.ndarray, step_minutes: int = 5) -> np.ndarray:
    minutes = (times.astype("datetime64[m]") - times.astype("datetime64[D]")).astype(np.int64)
    return minutes // step_minutes % (1440 // step_minutes)


def historical_average_table(data: TrafficData) -> np.ndarray:
    """``(slots, N)`` mean non-missing reading per slot of the day (288 for 5-minute data),
    from the training targets."""
    step = data.config.step_minutes
    slots_per_day = 1440 // step
    train = data.windows["train"]
    rows = train.stop + train.seq_len - 1 + train.first_offset + train.horizon - 1
    speeds = data.series.speeds[:rows].numpy().astype(np.float64)
    slots = _slots(data.speeds.index.to_numpy()[:rows], step)
    total = np.zeros((slots_per_day, speeds.shape[1]))
    count = np.zeros_like(total)
    np.add.at(total, slots, speeds)
    np.add.at(count, slots, speeds != 0)
    overall = total.sum(0) / np.maximum(count.sum(0), 1)
    return np.where(count > 0, total / np.maximum(count, 1), overall).astype(np.float32)


def evaluate_baseline(data: TrafficData, name: str, split: str = "test",
                      batch_size: int = 256, null_value: float = 0.0) -> MetricAccumulator:
    """Masked metrics of baseline ``name`` (``last_value`` or ``historical_average``) on a split."""
    windows = data.windows[split]
    acc = MetricAccumulator(windows.horizon, null_value)
    table = historical_average_table(data) if name == "historical_average" else None
    target_times = windows.target_times() if table is not None else None
    for start, (x, y) in zip(range(0, len(windows), batch_size), windows.batches(batch_size, scaler=RAW)):
        if table is None:
            pred = last_value(x, windows.horizon, data.scaler.mean)
        else:
            slots = _slots(target_times[start:start + len(x)], data.config.step_minutes)
            pred = torch.from_numpy(table[slots])
        acc.update(pred, y)
    return acc


# Table and plot labels of the baselines, in the order they are shown.
BASELINE_NAMES = {"last_value": "last value", "historical_average": "hist. average"}


def baseline_tables(data: TrafficData, split: str, null_value: float = 0.0) -> dict:
    """``{label: table}`` (rows: horizons and ``mean``) of every baseline on ``split``."""
    return {label: evaluate_baseline(data, name, split, null_value=null_value).table()
            for name, label in BASELINE_NAMES.items()}
