"""Calibrating an interval method for a forecaster, streaming it, and ``--latest``'s state.

The forecaster is anything with ``predict(windows, batch_size, positions=None)`` yielding
batches (see :class:`gwnet.intervals.methods.IntervalMethod`), ``horizon``, ``levels``,
``null_value`` and ``clamp``: a :class:`gwnet.ensemble.Ensemble` (one member or several).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from ..atomic import atomic_write_text
from ..engine.metrics import valid_mask
from ..errors import GWNetError, file_error
from ..registry import INTERVALS
from .methods import IntervalMethod, check_level
from .online import DEFAULT_STEP, OnlineConformal

# Training windows the difficulty of the normalised method is estimated on (evenly spread over
# the split, so every hour of the day and day of the week is seen; enough for a stable mean).
MAX_TRAINING_WINDOWS = 2016
# The --latest state file in gwnet-predict's output directory.
STATE_FILE = "intervals_state.json"


def choose_method(forecaster, method: str | None) -> str:
    """``method``, or the default: ``cqr`` for quantile forecasts, else ``normalized``."""
    if method is None or method == "auto":
        return "cqr" if forecaster.levels is not None else "normalized"
    spec = INTERVALS.get_entry(method, hint=" (or auto)")
    if spec.needs_quantiles and forecaster.levels is None:
        raise GWNetError(f"the {method} intervals need quantile forecasts from every member (gwnet-train "
                         "--quantiles ..., the same levels); use split or normalized")
    return method


def calibrate(forecaster, data, level: float, method: str | None = None, batch_size: int = 64,
              split: str = "val") -> IntervalMethod:
    """An interval method fitted for ``forecaster`` on ``data``'s ``split`` (the validation
    split; its difficulty, if it has one, on the training split)."""
    level = check_level(level)
    name = choose_method(forecaster, method)
    if split not in data.windows or len(data.windows[split]) == 0:
        raise file_error(data.source, f"has no {'validation' if split == 'val' else split} split to calibrate "
                         "intervals on (it holds only the last readings?); give the readings file with its history")
    fitted = INTERVALS[name](level, forecaster.horizon, forecaster.null_value, forecaster.clamp[0])
    if fitted.uses_training and "train" in data.windows and len(data.windows["train"]):
        train = data.windows["train"]
        positions = torch.from_numpy(np.unique(np.linspace(0, len(train) - 1, min(len(train), MAX_TRAINING_WINDOWS))
                                               .round().astype(np.int64)))
        fitted.fit_difficulty(forecaster.predict(train, batch_size, positions=positions))
    fitted.fit(forecaster.predict(data.windows[split], batch_size), source=f"{data.source} ({split} split)")
    return fitted


def apply(method: IntervalMethod, batches: Iterable, online: OnlineConformal | None = None) -> Iterator:
    """Set ``lower`` and ``upper`` of each batch (with the online widths, when given)."""
    for batch in batches:
        q = None
        if online is not None:
            q = torch.from_numpy(online.widths(batch.prediction.shape[2]))
        batch.lower, batch.upper = method.bounds(batch, q)
        yield batch


def start_online(method: IntervalMethod, step: float = DEFAULT_STEP) -> OnlineConformal:
    """An online update starting from ``method``'s calibrated widths."""
    return OnlineConformal(method.level, method.q.numpy(), method.score_unit().numpy(), step)


def stream(method: IntervalMethod, batches: Iterable, online: OnlineConformal | None,
           null_value: float = 0.0) -> Iterator:
    """The batches of consecutive windows in time order, each window's interval issued with the
    widths of that moment, and each reading fed to ``online`` once it has arrived (at the
    origin of a later window: its target time is at or before that origin). Without
    ``online`` the calibrated widths stay fixed (plain split conformal)."""
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for batch in batches:
        B, H, N = batch.prediction.shape
        lower = torch.empty(B, H, N)
        upper = torch.empty(B, H, N)
        y = batch.actual[:, :H]
        truth = torch.where(valid_mask(y, null_value), y, torch.nan).double().numpy()
        for i in range(B):
            origin = np.datetime64(batch.origins[i])
            if online is not None:
                pending = _reveal(online, pending, origin)
            one = _Row(batch, i)
            q = None if online is None else torch.from_numpy(online.widths(N))
            lo, hi = method.bounds(one, q)
            lower[i], upper[i] = lo[0], hi[0]
            if online is not None:
                pending.append((np.asarray(batch.target_times[i]), batch.prediction[i].double().numpy(),
                                lo[0].double().numpy(), hi[0].double().numpy(), truth[i]))
        batch.lower, batch.upper = lower, upper
        yield batch


def _reveal(online: OnlineConformal, pending: list, now: np.datetime64) -> list:
    """Feed ``online`` every pending reading whose time has come; keep the rest."""
    kept = []
    for times, pred, lo, hi, truth in pending:
        due = times <= now
        if due.any():
            known = np.where(due[:, None], truth, np.nan)
            online.update(pred, lo, hi, known)
            truth = np.where(due[:, None], np.nan, truth)  # each reading is scored once
        if not due.all():
            kept.append((times, pred, lo, hi, truth))
    return kept


class _Row:
    """One window of a batch, as a batch of one."""

    def __init__(self, batch, i: int):
        self.prediction = batch.prediction[i:i + 1]
        self.actual = None if batch.actual is None else batch.actual[i:i + 1]
        self.target_times = batch.target_times[i:i + 1]
        self.quantiles = None if getattr(batch, "quantiles", None) is None else batch.quantiles[i:i + 1]
        self.levels = getattr(batch, "levels", None)


# --- --latest: the online state across calls ------------------------------------------------
def load_state(path: str | os.PathLike, method: IntervalMethod) -> tuple[OnlineConformal | None, list]:
    """The online state an earlier ``--latest`` call left in ``path`` (``None`` if there is none,
    or if it was for another method, level or horizon count: then the update starts afresh)."""
    path = Path(path)
    if not path.is_file():
        return None, []
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise file_error(path, f"is not a readable interval state ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("online"), dict):
        raise file_error(path, "is not an interval state written by gwnet-predict")
    if (raw.get("method"), raw.get("level"), raw.get("horizon")) != (method.name, method.level, method.horizon):
        return None, []
    online = OnlineConformal.from_dict(raw["online"], source=str(path))
    pending = []
    for entry in raw.get("pending", []):
        try:
            pending.append({"origin": str(entry["origin"]), "target_times": [str(t) for t in entry["target_times"]],
                            "prediction": np.asarray(entry["prediction"], dtype=np.float64),
                            "lower": np.asarray(entry["lower"], dtype=np.float64),
                            "upper": np.asarray(entry["upper"], dtype=np.float64),
                            "scored": np.asarray(entry["scored"], dtype=bool)})
        except (KeyError, TypeError, ValueError) as exc:
            raise file_error(path, f"holds a malformed pending forecast ({exc})") from None
    return online, pending


def update_from_readings(online: OnlineConformal, pending: list, speeds: pd.DataFrame,
                         null_value: float = 0.0) -> tuple[list, int]:
    """Score the pending forecasts whose readings ``speeds`` now holds; ``(still pending, readings
    used)``. A forecast leaves once all its horizons are scored."""
    used, kept = 0, []
    index = speeds.index
    for entry in pending:
        times = pd.DatetimeIndex(entry["target_times"])
        pred = entry["prediction"]
        truth = np.full_like(pred, np.nan)
        for h, t in enumerate(times):
            if entry["scored"][h] or t not in index:
                continue
            row = speeds.loc[t].to_numpy(dtype=np.float64)
            truth[h] = np.where(row == null_value, np.nan, row) if not math.isnan(null_value) else row
            entry["scored"][h] = True
        if np.isfinite(truth).any():
            used += online.update(pred, entry["lower"], entry["upper"], truth)
        # Readings that are already before the file's first can never be scored: dropped.
        if not entry["scored"].all() and times[-1] >= index[0]:
            kept.append(entry)
    return kept, used


def save_state(path: str | os.PathLike, method: IntervalMethod, online: OnlineConformal, pending: list) -> None:
    """Write the state atomically (a kill leaves the previous one)."""
    state = {"method": method.name, "level": method.level, "horizon": method.horizon,
             "online": online.to_dict(),
             "pending": [{"origin": e["origin"], "target_times": e["target_times"],
                          "prediction": np.round(e["prediction"], 4).tolist(),
                          "lower": np.round(e["lower"], 4).tolist(), "upper": np.round(e["upper"], 4).tolist(),
                          "scored": e["scored"].tolist()} for e in pending]}
    atomic_write_text(path, json.dumps(state) + "\n")


def pending_entry(forecast, i: int = 0) -> dict[str, Any]:
    """A forecast with intervals, as the state keeps it until its readings arrive."""
    return {"origin": str(pd.Timestamp(forecast.origins[i])),
            "target_times": [str(pd.Timestamp(t)) for t in forecast.target_times[i]],
            "prediction": forecast.prediction[i].double().numpy(), "lower": forecast.lower[i].double().numpy(),
            "upper": forecast.upper[i].double().numpy(),
            "scored": np.zeros(forecast.prediction.shape[1], dtype=bool)}


def advance_online(method: IntervalMethod, online: OnlineConformal, pending: list, forecast, readings: pd.DataFrame,
                   null_value: float = 0.0, state: str | os.PathLike | None = None,
                   update: bool = True) -> tuple[list, int]:
    """Set ``forecast``'s ``lower``/``upper`` from the online widths; ``(pending, readings used)``.

    With ``update`` the pending forecasts are first scored against ``readings`` (moving the
    widths), this forecast replaces any pending one of the same origin and the state is written
    to ``state`` (when given). Without it nothing is scored, kept or written: the bounds of the
    widths as they stand, for a forecast from readings the online state must not learn from."""
    used = 0
    if update:
        pending, used = update_from_readings(online, pending, readings, null_value)
    widths = torch.from_numpy(online.widths(forecast.prediction.shape[2]))
    forecast.lower, forecast.upper = method.bounds(forecast, widths)
    if update:
        origin = str(pd.Timestamp(forecast.origins[0]))
        pending = [e for e in pending if e["origin"] != origin] + [pending_entry(forecast)]
        if state is not None:
            save_state(state, method, online, pending)
    return pending, used
