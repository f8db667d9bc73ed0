"""The report's figures: MAE by horizon, forecasts against readings, adaptive adjacencies.

matplotlib figures without pyplot, so no backend or global state is touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.dates import DateFormatter
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
        self.bands: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lower, upper) (b, H, k), with intervals
        self.kept = 0

    def update(self, forecast: Forecast) -> None:
        take = min(self.steps_per_day - self.kept, len(forecast.origins))
        if take <= 0:
            return
        self.times.append(forecast.target_times[:take])
        self.predictions.append(forecast.prediction[:take][..., self.index])
        self.actuals.append(forecast.actual[:take][..., self.index])
        if forecast.lower is not None:
            self.bands.append((forecast.lower[:take][..., self.index], forecast.upper[:take][..., self.index]))
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
        if self.bands and len(self.bands) == len(self.predictions):
            lower = torch.cat([b[0] for b in self.bands]).numpy()
            upper = torch.cat([b[1] for b in self.bands]).numpy()
            for h, frame in zip(self.horizons, forecasts.values()):
                with_band(frame, lower[:, h - 1], upper[:, h - 1])
        return readings, forecasts


def with_band(frame: pd.DataFrame, lower: np.ndarray, upper: np.ndarray) -> pd.DataFrame:
    """Attach an interval to a forecast frame (same index and columns): plot_sensors shades it."""
    frame.attrs["lower"] = pd.DataFrame(lower, index=frame.index, columns=frame.columns)
    frame.attrs["upper"] = pd.DataFrame(upper, index=frame.index, columns=frame.columns)
    return frame


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


# Members' markers and line styles, in turn: two members with equal scores stay visible.
MARKERS = ("o", "^", "v", "D", "P", "X", "<", ">")
STYLES = ("-", "--", "-.", ":")


def plot_mae_by_horizon(metrics: pd.DataFrame, path: str | Path, lead_minutes: np.ndarray,
                        unit: str = "", baselines: dict[str, pd.DataFrame] | None = None) -> Path:
    """MAE per horizon: a line per member (its own marker and dash), the ensemble as a wide
    pale band under them (a member equal to it stays visible on top), and each baseline of
    ``baselines`` (``{label: table with an mae column by horizon}``) dotted grey; the y-axis
    says the unit MAE is measured in."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    members = 0
    for name, rows in metrics.groupby("model", sort=False):
        x = lead_minutes[rows["horizon"].to_numpy() - 1]
        if name == ENSEMBLE:
            ax.plot(x, rows["mae"], lw=7, alpha=0.35, color="black", solid_capstyle="round", label=name, zorder=1)
            continue
        ax.plot(x, rows["mae"], marker=MARKERS[members % len(MARKERS)], ls=STYLES[members % len(STYLES)],
                lw=1.4, ms=5, label=name, zorder=3)
        members += 1
    for i, (label, table) in enumerate((baselines or {}).items()):
        mae = table["mae"].drop("mean", errors="ignore").to_numpy()[:len(lead_minutes)]
        ax.plot(lead_minutes[:len(mae)], mae, ls=":", lw=1.2, color=("0.45", "0.65")[i % 2],
                marker=".", label=f"{label} (baseline)", zorder=2)
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
            line, = ax.plot(frame.index, frame[sensor], lw=1.0, label=label)
            if "lower" in frame.attrs:  # a calibrated interval (gwnet-predict --interval)
                ax.fill_between(frame.index, frame.attrs["lower"][sensor], frame.attrs["upper"][sensor],
                                color=line.get_color(), alpha=0.2, lw=0, label=f"{label} interval")
        ax.set(ylabel=ylabel, title=f"sensor {sensor}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    # Dates with their year: a forecast's day is only readable with it.
    axes[-1].xaxis.set_major_formatter(DateFormatter("%Y-%m-%d %H:%M"))
    axes[-1].set_xlabel("time (the readings' own clock)")
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
