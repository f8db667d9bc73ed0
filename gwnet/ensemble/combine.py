"""The ensemble: members' forecasts combined per horizon with weights a strategy sets."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import TrafficData, Windows
from ..engine.metrics import MetricAccumulator, valid_mask
from ..errors import GWNetError
from ..registry import STRATEGIES
from .members import Member, check_compatible
from .strategies import Validation


@dataclass
class Forecast:
    """One batch of forecasts: ``B`` origins, ``H`` horizons, ``N`` sensors, real units."""

    origins: pd.DatetimeIndex  # (B,) time of each window's last input
    target_times: np.ndarray  # (B, H) datetime64
    prediction: torch.Tensor  # (B, H, N) the ensemble
    members: list[torch.Tensor]  # (B, h_m, N) each member
    actual: torch.Tensor | None  # (B, H, N) readings, null_value where missing; None: the future
    # Quantile runs: (B, H, Q, N) at ``levels`` (combined like the points, when every member
    # has the same levels); None otherwise.
    quantiles: torch.Tensor | None = None
    levels: tuple[float, ...] | None = None
    # Calibrated intervals (gwnet.intervals), (B, H, N); None when none was asked for.
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None


class Ensemble:
    """Members combined per horizon by ``strategy``, a name in :data:`gwnet.registry.STRATEGIES`
    (see :mod:`gwnet.ensemble.strategies`).

    ``weights[h, m]`` is member ``m``'s share of horizon ``h + 1``; zero where it does not
    forecast that horizon. A strategy that needs no validation (``mean``) is ready at once;
    the others (``per-horizon``, ``weighted``) need :meth:`fit` on validation windows first.
    """

    def __init__(self, members: Sequence[Member], strategy: str = "mean"):
        self.spec = STRATEGIES.get_entry(strategy)
        if not members:
            raise GWNetError("an ensemble needs at least one member")
        check_compatible(members)
        self.members = list(members)
        self.strategy = strategy
        self.horizon = max(m.horizon for m in members)
        cfg = members[0].config
        self.null_value = cfg.train.null_value
        # Every member's predictions lie in its own clamp range; the union keeps all of them.
        self.clamp = (min(m.config.train.clamp_min for m in members),
                      max(math.inf if m.config.train.clamp_max is None else m.config.train.clamp_max
                          for m in members))
        self.lead = cfg.data.first_offset + np.arange(self.horizon)  # steps after the origin
        # Minutes between readings: the runs record it (gwnet 0.1 runs were all 5-minute).
        self.step = pd.Timedelta(minutes=cfg.data.step_minutes or 5)
        self.lead_minutes = self.lead * (self.step // pd.Timedelta(minutes=1))
        self.available = np.array([[h < m.horizon for m in members] for h in range(self.horizon)])
        self.weights = STRATEGIES["mean"].weights(None, self.available)
        if not self.spec.needs_validation:
            self.weights = self.spec.weights(None, self.available)
        self.fitted = not self.spec.needs_validation

    # --- fitting ----------------------------------------------------------------------------
    def fit(self, windows: Windows, batch_size: int = 64, source: str = "validation data") -> "Ensemble":
        """Measure each member on ``windows`` (validation) and set the weights, in one pass.

        Sets every member's ``val_mae``. For ``weighted`` it accumulates, per horizon and over
        the valid readings only, the Gram matrix of the members' predictions and their products
        with the readings, all NNLS needs.
        """
        self._check_windows(windows)
        H, M = self.horizon, len(self.members)
        scores = [MetricAccumulator(m.horizon, self.null_value) for m in self.members]
        gram = torch.zeros(H, M, M, dtype=torch.float64)
        xty = torch.zeros(H, M, dtype=torch.float64)
        counts = torch.zeros(H, dtype=torch.int64)
        for positions in _chunks(len(windows), batch_size):
            preds, y = self._member_outputs(windows, positions)
            for acc, pred in zip(scores, preds):
                acc.update(pred, y[:, :pred.shape[1]])
            mask = valid_mask(y, self.null_value)
            counts += mask.sum(dim=(0, 2))
            cols = torch.stack([_pad(p, H) for p in preds]).double() * mask  # (M, B, H, N)
            gram += torch.einsum("mbhn,kbhn->hmk", cols, cols)
            xty += torch.einsum("mbhn,bhn->hm", cols, torch.where(mask, y.double(), 0.0))
        for member, acc in zip(self.members, scores):
            member.val_mae = acc.per_horizon()["mae"].to_numpy()
        if (counts == 0).any():
            h = int(torch.nonzero(counts == 0)[0]) + 1
            raise GWNetError(f"{source}: no valid readings at horizon {h} to fit the ensemble on; "
                             "use --strategy mean or more data")
        mae = np.stack([_pad_np(m.val_mae, H) for m in self.members], 1)
        stats = Validation(np.where(self.available, mae, np.inf), gram.numpy(), xty.numpy())
        self.weights = self.spec.weights(stats, self.available)
        self.fitted = True
        return self

    def fit_without_validation(self, source: str = "the data") -> "Ensemble":
        """Set the weights where no validation windows are needed to choose them: a single
        member under ``per-horizon`` is that member at every horizon. Any other case is a
        :class:`GWNetError` saying what to do."""
        if len(self.members) == 1 and self.strategy == "per-horizon":
            self.weights = self.available.astype(np.float64)
            self.fitted = True
            return self
        raise GWNetError(f"{source}: no validation split to fit the {self.strategy} ensemble on (the file "
                         "holds only the last readings); use --strategy mean, or give the readings "
                         "file with its history")

    # --- predicting -------------------------------------------------------------------------
    def combine(self, preds: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, H, N)`` ensemble forecast from the members' ``(B, h_m, N)`` forecasts."""
        if not self.fitted:
            raise RuntimeError(f"a {self.strategy} ensemble must be fit on validation windows first")
        out = torch.zeros(preds[0].shape[0], self.horizon, preds[0].shape[2], dtype=torch.float64)
        weights = torch.from_numpy(self.weights)
        for m, pred in enumerate(preds):
            h = pred.shape[1]
            out[:, :h] += weights[:h, m, None] * pred.double()
        return out.clamp(*self.clamp).float()

    def predict(self, windows: Windows, batch_size: int = 64,
                positions: torch.Tensor | None = None) -> Iterator[Forecast]:
        """Forecasts of every window (or of the windows at ``positions``), batch by batch, in
        window order."""
        self._check_windows(windows)
        origins = windows.origins
        chunks = _chunks(len(windows), batch_size) if positions is None else positions.split(batch_size)
        for chunk in chunks:
            preds, quantiles, y = self._member_forecasts(windows, chunk)
            stamps = origins[chunk.numpy()]
            yield Forecast(stamps, self._target_times(stamps), self.combine(preds), preds, y,
                           *self.combine_quantiles(quantiles))

    def predict_latest(self, data: TrafficData) -> Forecast:
        """The next ``H`` steps after the last ``seq_len`` readings of ``data``."""
        preds, quantiles = [], []
        for m in self.members:
            x, origin = data.latest(m.scaler)
            point, quantile = m.forward_all(x)
            preds.append(point)
            quantiles.append(quantile)
        stamps = pd.DatetimeIndex([origin])
        return Forecast(stamps, self._target_times(stamps), self.combine(preds), preds, None,
                        *self.combine_quantiles(quantiles))

    @property
    def levels(self) -> tuple[float, ...] | None:
        """The quantile levels the ensemble forecasts: those of its members when every member is
        a quantile run with the same levels (a mixed ensemble forecasts points only)."""
        levels = {m.levels for m in self.members}
        return levels.pop() if len(levels) == 1 else None

    def combine_quantiles(self, quantiles: Sequence[torch.Tensor | None]
                          ) -> tuple[torch.Tensor | None, tuple[float, ...] | None]:
        """``((B, H, Q, N), levels)``: each level combined with the points' weights (quantile
        averaging), sorted so levels never cross; ``(None, None)`` unless :attr:`levels`."""
        levels = self.levels
        if levels is None or any(q is None for q in quantiles):
            return None, None
        out = torch.stack([self.combine([q[:, :, i] for q in quantiles]) for i in range(len(levels))], dim=2)
        return out.sort(dim=2).values, levels

    def _member_outputs(self, windows: Windows,
                        positions: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        preds, _, y = self._member_forecasts(windows, positions)
        return preds, y

    def _member_forecasts(self, windows: Windows, positions: torch.Tensor
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
        """Each member's point forecast and quantiles (``None`` for point members), the readings."""
        preds, quantiles = [], []
        for m in self.members:
            x, y = windows.batch(positions, scaler=m.scaler)
            point, quantile = m.forward_all(x)
            preds.append(point)
            quantiles.append(quantile)
        return preds, quantiles, y[:, :self.horizon]

    def _target_times(self, origins: pd.DatetimeIndex) -> np.ndarray:
        return origins.to_numpy()[:, None] + self.lead[None, :] * self.step.to_timedelta64()

    def _check_windows(self, windows: Windows) -> None:
        seq_len = self.members[0].config.data.seq_len
        if windows.horizon < self.horizon or windows.seq_len != seq_len:
            raise GWNetError(f"windows of {windows.seq_len} -> {windows.horizon} steps do not fit the "
                             f"ensemble ({seq_len} -> {self.horizon}); window the data with data_config()")

    # --- reporting --------------------------------------------------------------------------
    def selection(self) -> pd.DataFrame:
        """One row per horizon and member that forecasts it: weight and validation MAE."""
        rows = []
        for h in range(self.horizon):
            for m, member in enumerate(self.members):
                if self.available[h, m]:
                    val = member.val_mae[h] if member.val_mae is not None else np.nan
                    rows.append({"horizon": h + 1, "member": member.name,
                                 "weight": float(self.weights[h, m]), "val_mae": float(val)})
        return pd.DataFrame(rows)

    def describe(self) -> dict:
        """The ensemble as JSON-ready data: members, strategy, and per horizon its weights."""
        horizons = []
        for h in range(self.horizon):
            entry = {"horizon": h + 1, "lead_minutes": int(self.lead_minutes[h]),
                     "weights": {m.name: float(self.weights[h, i])
                                 for i, m in enumerate(self.members) if self.available[h, i]}}
            if self.spec.describe is not None:
                entry.update(self.spec.describe(self.weights[h], [m.name for m in self.members]))
            horizons.append(entry)
        return {"strategy": self.strategy, "horizon": self.horizon,
                "members": [{"name": m.name, "source": str(m.source), "horizon": m.horizon}
                            for m in self.members],
                "horizons": horizons}



def _chunks(n: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    return torch.arange(n).split(batch_size)


def _pad(pred: torch.Tensor, horizon: int) -> torch.Tensor:
    """Zero-pad a ``(B, h, N)`` forecast to ``horizon`` steps (zero columns do not enter NNLS)."""
    return torch.nn.functional.pad(pred, (0, 0, 0, horizon - pred.shape[1]))


def _pad_np(values: np.ndarray, horizon: int) -> np.ndarray:
    return np.pad(values, (0, horizon - len(values)), constant_values=np.nan)
