"""The report's figures: MAE by horizon, forecasts against readings, adaptive adjacencies.

matplotlib figures without pyplot, so no backend or global state is touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..atomic import atomic_path
from ..engine.metrics import valid_mask
from .combine import Forecast
from .members import ENSEMBLE, Member

DAY = pd.Timedelta(days=1)


class SensorTrace:
    """The first day of forecasts at a few sensors (horizon 1 and the last), for the plot;
    it stops keeping anything after a day, so memory stays flat."""

    def __init__(self, sensor_index: Sequence[int], horizon: int, steps_per_day: int = 288):
        self.steps_per_day = steps_per_day
        self.index = list(sensor_index)
        self.horizons = sorted({1, horizon})
        self.times: list[np.ndarray] = []  # (b, H) target times
        self.predictions: list[torch.Tensor] = []  # (b, H, k)
        self.actuals: list[torch.Tensor] = []  # (b, H, k)
        self.kept = 0

    def update(self, forecast: Forecast) -> None:
        take = min(self.steps_per_day - self.kept, len(forecast.origins))
        if take <= 0:
            return
        self.times.append(forecast.target_times[:take])
        self.predictions.append(forecast.prediction[:take][..., self.index])
        self.actuals.append(forecast.actual[:take][..., self.index])
        self.kept += take

    def frames(self, sensor_ids: Sequence[str], lead_minutes: np.ndarray,
               null_value: float = 0.0) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        """Readings (time x sensors, NaN where missing) and the forecasts at each kept horizon."""
        times = np.concatenate(self.times)
        pred = torch.cat(self.predictions).numpy()
        actual = torch.cat(self.actuals)
        actual = torch.where(valid_mask(actual, null_value), actual, torch.nan).numpy()
        columns = [sensor_ids[i] for i in self.index]
        readings = pd.DataFrame(actual[:, 0], index=times[:, 0], columns=columns)
        forecasts = {f"+{lead_minutes[h - 1]} min": pd.DataFrame(pred[:, h - 1], index=times[:, h - 1],
                                                                 columns=columns)
                     for h in self.horizons}
        return readings, forecasts


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_mae_by_horizon(metrics: pd.DataFrame, path: str | Path, lead_minutes: np.ndarray,
                        unit: str = "") -> Path:
    """MAE per horizon: a thin line per member, a thick one for the ensemble; the y-axis says
    the unit MAE is measured in."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for name, rows in metrics.groupby("model", sort=False):
        ours = name == ENSEMBLE
        ax.plot(lead_minutes[rows["horizon"].to_numpy() - 1], rows["mae"], marker="o",
                lw=2.5 if ours else 1.2, color="black" if ours else None, label=name, zorder=3 if ours else 2)
    ax.set(xlabel="minutes ahead", ylabel=f"MAE ({unit})" if unit else "MAE", title="MAE by horizon")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_sensors(readings: pd.DataFrame, forecasts: dict[str, pd.DataFrame], path: str | Path,
                 ylabel: str = "speed") -> Path:
    """One panel per sensor: the readings and each forecast series over time."""
    sensors = list(readings.columns)
    fig = Figure(figsize=(9, 1.2 + 2.4 * len(sensors)), layout="constrained")
    axes = fig.subplots(len(sensors), 1, sharex=True, squeeze=False)[:, 0]
    for ax, sensor in zip(axes, sensors):
        ax.plot(readings.index, readings[sensor], color="black", lw=1.2, label="actual")
        for label, frame in forecasts.items():
            ax.plot(frame.index, frame[sensor], lw=1.0, label=label)
        ax.set(ylabel=ylabel, title=f"sensor {sensor}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    for label in axes[-1].get_xticklabels():
        label.set(rotation=30, horizontalalignment="right")
    return _save(fig, Path(path))


def adaptive_adjacency(model: torch.nn.Module) -> np.ndarray | None:
    """The model's learned ``softmax(relu(E1 E2))`` (``None`` for a model without one)."""
    adaptive = getattr(model, "adaptive", None)
    if adaptive is None:
        return None
    with torch.no_grad():
        # topk/lowrank forms return a support object from forward(); dense() is the matrix.
        return getattr(adaptive, "dense", adaptive)().float().cpu().numpy()


def plot_adaptive_adjacency(members: Sequence[Member], sensor_ids: Sequence[str],
                            path: str | Path) -> Path | None:
    """Heatmaps of each member's adaptive adjacency (row = source sensor); ``None`` if no
    member learns one."""
    found = [(m.name, a) for m in members if (a := adaptive_adjacency(m.model)) is not None]
    if not found:
        return None
    fig = Figure(figsize=(4.8 * len(found), 4.4), layout="constrained")
    for ax, (name, adj) in zip(fig.subplots(1, len(found), squeeze=False)[0], found):
        image = ax.imshow(adj, cmap="viridis", interpolation="nearest")
        ax.set(title=name, xlabel="target sensor", ylabel="source sensor")
        if len(sensor_ids) <= 30:  # ids stay legible; beyond that positions say as much
            ticks = np.arange(len(sensor_ids))
            ax.set_xticks(ticks, sensor_ids, rotation=90, fontsize=7)
            ax.set_yticks(ticks, sensor_ids, fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("adaptive adjacency softmax(relu(E1 E2))")
    return _save(fig, Path(path))
