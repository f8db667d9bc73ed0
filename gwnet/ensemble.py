"""Ensembles of trained Graph WaveNet models: combine members per horizon, predict, report.

Shleifer et al. (2019) found that a model trained for short horizons combined with one
trained for long horizons beats either alone. An :class:`Ensemble` holds such *members*
(run directories, or checkpoints of the reference implementations) and combines their
forecasts horizon by horizon, with one of three strategies:

``mean``         the average of the members that forecast the horizon
``per-horizon``  the member with the lowest validation MAE at the horizon
``weighted``     non-negative weights per horizon: least squares on the validation readings
                 (NNLS). The weights are *not* normalised to sum to one: the least-squares
                 optimum is over all non-negative weights, so rescaling it would make it worse
                 on validation and lose the guarantee that it is no worse than the best single
                 member (every member alone is a feasible point); free scale also corrects a
                 bias the members share. Their sum is reported.

``per-horizon`` and ``weighted`` are fitted on the validation split of the data being
predicted (so on validation the per-horizon ensemble equals the best member at every
horizon). Members may forecast different numbers of horizons (a 6-horizon and a 12-horizon model):
the data are windowed with the largest, and a member with ``h`` horizons takes part in
horizons ``1..h`` only. Each member scales its inputs with its own scaler. Everything
streams in batches, so memory does not grow with the number of windows: fitting keeps
per-horizon sufficient statistics (MAE sums; ``X^T X`` and ``X^T y`` for NNLS), prediction
writes the table batch by batch.

:func:`run` writes one output directory, since one prediction makes several files that belong
together (every file written atomically)::

    predictions.csv        one row per origin, horizon and sensor: origin_time, target_time,
      (or .parquet)        sensor_id, horizon (1..H), prediction, actual (empty where unknown:
                           the future, or a missing reading; never 0)
    metrics.csv            model, horizon, mae, rmse, mape of every member and the ensemble
    ensemble.json, .csv    how each horizon combines the members: weights, choice, validation MAE
    mae_by_horizon.png     MAE by horizon, members against the ensemble
    sensors.png            forecasts (+5 min and the last horizon) against readings over the
                           first day of the split at a few sensors
    adaptive_adjacency.png each member's learned adjacency softmax(relu(E1 E2))

With ``split="latest"`` it forecasts the next ``H`` steps after the last readings instead:
no actuals, so no metrics and no MAE plot, and the sensor plot shows the last day of
readings followed by the forecast.

Reference checkpoints (a ``.pth`` state_dict of the original implementations) join as
members through :func:`gwnet.nn.load_reference_checkpoint`, on the data's graph and with the
data's own fitted scaler, since such a file holds weights only.
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.optimize
import torch
from matplotlib.figure import Figure

from .atomic import atomic_path, atomic_write_text
from .config import Config, DataConfig, TrainConfig
from .data import TrafficData, Windows, load_data
from .data.readers import STEP
from .data.scaler import StandardScaler
from .engine.metrics import MetricAccumulator, valid_mask
from .engine.trainer import forecast, load_trained
from .errors import GWNetError, file_error
from .nn import GWNet, load_reference_checkpoint

STRATEGIES = ("mean", "per-horizon", "weighted")
ENSEMBLE = "ensemble"  # the ensemble's name in metrics and plots
SPLITS = ("test", "val", "all", "latest")
FORMATS = ("csv", "parquet")
COLUMNS = ("origin_time", "target_time", "sensor_id", "horizon", "prediction", "actual")
# Options that shape a member's input windows and targets: members must agree on all of them.
WINDOW_FIELDS = ("seq_len", "first_offset", "time_of_day", "day_of_week")
SOURCE_FIELDS = ("dataset", "data", "adj", "key")
STEPS_PER_DAY = pd.Timedelta(days=1) // STEP


# --- members --------------------------------------------------------------------------------
@dataclass
class Member:
    """One model of an ensemble and what it needs to read windows: its own scaler and config."""

    name: str
    model: GWNet
    config: Config
    scaler: StandardScaler
    source: Path
    sensor_ids: list[str] | None = None  # None: a reference checkpoint, which follows the data
    val_mae: np.ndarray | None = field(default=None, repr=False)  # horizons 1..h, set by fit

    @property
    def horizon(self) -> int:
        return self.config.model.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, horizon, N)`` forecast in real units, clamped as evaluation clamps, on the CPU."""
        return forecast(self.model, x, self.scaler, self.config.train, next(self.model.parameters()).device)


def member_names(paths: Sequence[str | Path]) -> list[str]:
    """Short names for reports: the directory or file name; absolute paths where those clash
    with each other or with the ensemble's own name."""
    short = [Path(p).name for p in paths]
    if len(set(short)) == len(short) and ENSEMBLE not in short:
        return short
    return [str(Path(p).absolute()) for p in paths]


def load_member(path: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> Member:
    """A run directory's best model as a member."""
    model, cfg, scaler, sensor_ids = load_trained(path, device)
    return Member(name or Path(path).name, model, cfg, scaler, Path(path), sensor_ids)


def load_reference_member(path: str | Path, data: TrafficData, device: str | torch.device = "cpu",
                          name: str | None = None) -> Member:
    """A reference implementation's state_dict as a member on ``data``'s sensor graph.

    Such a file holds weights only: the member scales with ``data``'s own fitted scaler and
    evaluates with the default clamp range and missing-value marker.
    """
    try:
        model = load_reference_checkpoint(path, adj=data.graph.adj, adjtype=data.config.adjtype)
    except GWNetError as exc:
        raise exc if str(exc).startswith(str(path)) else file_error(path, str(exc)) from None
    if model.config.in_dim != data.config.in_dim:
        raise file_error(path, f"takes {model.config.in_dim} input features, the data gives "
                         f"{data.config.in_dim} (time_of_day, day_of_week)")
    cfg = Config(data=copy.deepcopy(data.config), model=model.config, train=TrainConfig())
    cfg.data.horizon = model.config.out_dim
    return Member(name or Path(path).name, model.to(device), cfg, data.scaler, Path(path))


def load_members(paths: Sequence[str | Path], device: str | torch.device = "cpu",
                  **source: str | None) -> tuple[list[Member], TrafficData]:
    """Members (run directories; files are reference checkpoints) and the data windowed for
    them: see :func:`data_config` for which data and ``source`` for replacing it."""
    resolved = [Path(p).resolve() for p in paths]
    for path, where in zip(paths, resolved):
        if resolved.count(where) > 1:
            raise file_error(path, "is given twice; each member once")
    names = dict(zip(map(str, paths), member_names(paths)))
    members = {str(p): load_member(p, device, names[str(p)]) for p in paths if not Path(p).is_file()}
    if members:
        check_compatible(list(members.values()))
    cfg = data_config(list(members.values()), **source)
    data = load_ensemble_data(list(members.values()), cfg)
    references = [p for p in paths if Path(p).is_file()]
    for path in references:
        members[str(path)] = load_reference_member(path, data, device, names[str(path)])
    horizon = max(m.horizon for m in members.values())
    if horizon > cfg.horizon:
        # A reference forecasts further than the runs: window again, so every member sees the
        # same windows; references take the scaler fitted on the new windows.
        cfg.horizon = horizon
        data = TrafficData.from_frames(data.speeds, data.graph, cfg, source=data.source)
        for path in references:
            members[str(path)].scaler = data.scaler
    return [members[str(p)] for p in paths], data


def check_compatible(members: Sequence[Member]) -> None:
    """Members must read the same windows of the same sensors; name the first that does not."""
    first = members[0]
    for m in members[1:]:
        for name in WINDOW_FIELDS:
            ours, theirs = getattr(first.config.data, name), getattr(m.config.data, name)
            if ours != theirs:
                raise file_error(m.source, f"{name} is {theirs!r} but {ours!r} in {first.source}; "
                                 "ensemble members must read the same input windows")
        if m.config.train.null_value != first.config.train.null_value:
            raise file_error(m.source, f"marks missing readings with {m.config.train.null_value!r}, "
                             f"{first.source} with {first.config.train.null_value!r}")
        if None not in (m.sensor_ids, first.sensor_ids) and m.sensor_ids != first.sensor_ids:
            difference = _describe_difference(first.sensor_ids, m.sensor_ids)
            raise file_error(m.source, f"was trained on other sensors than {first.source} ({difference})")


def _describe_difference(ours: list[str], theirs: list[str]) -> str:
    if len(ours) != len(theirs):
        return f"{len(theirs)} instead of {len(ours)}"
    if set(ours) == set(theirs):
        return "same ids in another order"
    extra = sorted(set(theirs) - set(ours))
    return f"{len(extra)} of {len(theirs)} ids differ, e.g. {extra[0]!r}"


def data_config(members: Sequence[Member], **source: str | None) -> DataConfig:
    """The data the members are windowed from: the first member's data options (defaults when
    there is none) with the largest horizon of the members, read from ``source`` where given.

    ``source`` takes ``dataset``, ``data``, ``adj`` and ``key`` as gwnet-train does. A new
    ``dataset`` replaces the saved speeds file, graph and key; a new ``data`` file keeps the
    saved graph (new readings of the same sensors) but not the saved HDF5 key.
    """
    cfg = copy.deepcopy(members[0].config.data) if members else DataConfig()
    given = {k: v for k, v in source.items() if v is not None}
    unknown = set(given) - set(SOURCE_FIELDS)
    if unknown:
        raise TypeError(f"unknown data source option(s): {', '.join(sorted(unknown))}")
    if "dataset" in given:
        cfg.data = cfg.adj = cfg.key = None
    if "data" in given:
        cfg.key = None
    for name, value in given.items():
        setattr(cfg, name, value)
    cfg.horizon = max((m.horizon for m in members), default=cfg.horizon)
    return cfg


def load_ensemble_data(members: Sequence[Member], cfg: DataConfig) -> TrafficData:
    """Read ``cfg``'s data and put its sensors in the members' order (same ids required)."""
    data = load_data(cfg)
    expected = next((m.sensor_ids for m in members if m.sensor_ids is not None), None)
    if expected is None or data.sensor_ids == expected:
        return data
    if set(data.sensor_ids) != set(expected):
        raise file_error(data.source, f"sensors differ from the members' "
                         f"({_describe_difference(expected, data.sensor_ids)}); predict on readings "
                         f"of the sensors the models were trained on")
    # Same sensors in another column order: reorder the readings, the models index by position.
    return TrafficData.from_frames(data.speeds[expected], data.graph, cfg, source=data.source)


# --- the ensemble ---------------------------------------------------------------------------
@dataclass
class Forecast:
    """One batch of forecasts: ``B`` origins, ``H`` horizons, ``N`` sensors, real units."""

    origins: pd.DatetimeIndex  # (B,) time of each window's last input
    target_times: np.ndarray  # (B, H) datetime64
    prediction: torch.Tensor  # (B, H, N) the ensemble
    members: list[torch.Tensor]  # (B, h_m, N) each member
    actual: torch.Tensor | None  # (B, H, N) readings, null_value where missing; None: the future


class Ensemble:
    """Members combined per horizon by ``strategy`` (see the module docstring).

    ``weights[h, m]`` is member ``m``'s share of horizon ``h + 1``; zero where it does not
    forecast that horizon. ``mean`` is ready at once; ``per-horizon`` and ``weighted`` need
    :meth:`fit` on validation windows first.
    """

    def __init__(self, members: Sequence[Member], strategy: str = "mean"):
        if strategy not in STRATEGIES:
            raise GWNetError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
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
                      max(m.config.train.clamp_max for m in members))
        self.lead = cfg.data.first_offset + np.arange(self.horizon)  # steps after the origin
        self.lead_minutes = self.lead * (STEP // pd.Timedelta(minutes=1))
        self.available = np.array([[h < m.horizon for m in members] for h in range(self.horizon)])
        self.weights = self.available / self.available.sum(axis=1, keepdims=True)
        self.fitted = strategy == "mean"

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
        if self.strategy == "per-horizon":
            mae = np.where(self.available, np.stack([_pad_np(m.val_mae, H) for m in self.members], 1), np.inf)
            self.weights = np.eye(M)[mae.argmin(axis=1)]
        elif self.strategy == "weighted":
            weights = np.zeros((H, M))
            for h in range(H):
                idx = np.flatnonzero(self.available[h])
                weights[h, idx] = nnls_from_gram(gram[h][np.ix_(idx, idx)].numpy(), xty[h, idx].numpy())
            self.weights = weights
        self.fitted = True
        return self

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

    def predict(self, windows: Windows, batch_size: int = 64) -> Iterator[Forecast]:
        """Forecasts of every window, batch by batch, in window order."""
        self._check_windows(windows)
        origins = windows.origins
        for positions in _chunks(len(windows), batch_size):
            preds, y = self._member_outputs(windows, positions)
            stamps = origins[positions.numpy()]
            yield Forecast(stamps, self._target_times(stamps), self.combine(preds), preds, y)

    def predict_latest(self, data: TrafficData) -> Forecast:
        """The next ``H`` steps after the last ``seq_len`` readings of ``data``."""
        preds = []
        for m in self.members:
            x, origin = data.latest(m.scaler)
            preds.append(m.forward(x))
        stamps = pd.DatetimeIndex([origin])
        return Forecast(stamps, self._target_times(stamps), self.combine(preds), preds, None)

    def _member_outputs(self, windows: Windows,
                        positions: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        preds = []
        for m in self.members:
            x, y = windows.batch(positions, scaler=m.scaler)
            preds.append(m.forward(x))
        return preds, y[:, :self.horizon]

    def _target_times(self, origins: pd.DatetimeIndex) -> np.ndarray:
        return origins.to_numpy()[:, None] + self.lead[None, :] * STEP.to_timedelta64()

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
            if self.strategy == "per-horizon":
                entry["member"] = self.members[int(self.weights[h].argmax())].name
            if self.strategy == "weighted":
                entry["weight_sum"] = float(self.weights[h].sum())
            horizons.append(entry)
        return {"strategy": self.strategy, "horizon": self.horizon,
                "members": [{"name": m.name, "source": str(m.source), "horizon": m.horizon}
                            for m in self.members],
                "horizons": horizons}


def nnls_from_gram(gram: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} ||X w - y||^2`` from ``X^T X`` and ``X^T y`` alone.

    With ``X^T X = V S V^T`` the objective is ``||S^1/2 V^T w - S^-1/2 V^T X^T y||^2`` plus a
    constant (``X^T y`` lies in the range of ``X^T X``), an ordinary NNLS problem of size M.
    Eigenvalues that are zero up to rounding (members predicting identically) are dropped.
    """
    s, v = np.linalg.eigh(gram)
    keep = s > max(s.max(), 0.0) * 1e-12
    if not keep.any():  # every prediction is zero: any weights do equally well
        return np.zeros(len(xty))
    root = np.sqrt(s[keep])
    a = root[:, None] * v[:, keep].T
    b = (v[:, keep].T @ xty) / root
    return scipy.optimize.nnls(a, b)[0]


def _chunks(n: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    return torch.arange(n).split(batch_size)


def _pad(pred: torch.Tensor, horizon: int) -> torch.Tensor:
    """Zero-pad a ``(B, h, N)`` forecast to ``horizon`` steps (zero columns do not enter NNLS)."""
    return torch.nn.functional.pad(pred, (0, 0, 0, horizon - pred.shape[1]))


def _pad_np(values: np.ndarray, horizon: int) -> np.ndarray:
    return np.pad(values, (0, horizon - len(values)), constant_values=np.nan)


# --- output ---------------------------------------------------------------------------------
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
    return pd.DataFrame({
        "origin_time": np.repeat(forecast.origins.to_numpy(), H * N),
        "target_time": np.repeat(forecast.target_times.ravel(), N),
        "sensor_id": pd.Categorical.from_codes(np.tile(np.arange(N), B * H), categories=list(sensor_ids)),
        "horizon": np.tile(np.repeat(np.arange(1, H + 1, dtype=np.int32), N), B),
        "prediction": forecast.prediction.numpy().astype(np.float32).ravel(),
        "actual": actual.ravel(),
    })


class PredictionWriter:
    """Writes the tidy table batch by batch to a temporary file, renamed into place on success.

    The format follows the extension: ``.csv`` (empty field for unknown actuals) or
    ``.parquet`` (one row group per batch; unknown actuals are nulls).
    """

    def __init__(self, path: str | Path, sensor_ids: Sequence[str], null_value: float = 0.0):
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
                ("prediction", pa.float32()), ("actual", pa.float32())])
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
                      null_value: float = 0.0) -> int:
    """Stream ``forecasts`` into ``path`` (``.csv`` or ``.parquet``); the number of rows."""
    with PredictionWriter(path, sensor_ids, null_value) as writer:
        for batch in forecasts:
            writer.write(batch)
    return writer.rows


def metrics_frame(scores: dict[str, MetricAccumulator]) -> pd.DataFrame:
    """Long table ``model, horizon, mae, rmse, mape`` (mape as a fraction)."""
    parts = [acc.per_horizon().reset_index().assign(model=name) for name, acc in scores.items()]
    return pd.concat(parts, ignore_index=True)[["model", "horizon", "mae", "rmse", "mape"]]


class SensorTrace:
    """The first day of forecasts at a few sensors (horizon 1 and the last), for the plot;
    it stops keeping anything after a day, so memory stays flat."""

    def __init__(self, sensor_index: Sequence[int], horizon: int):
        self.index = list(sensor_index)
        self.horizons = sorted({1, horizon})
        self.times: list[np.ndarray] = []  # (b, H) target times
        self.predictions: list[torch.Tensor] = []  # (b, H, k)
        self.actuals: list[torch.Tensor] = []  # (b, H, k)
        self.kept = 0

    def update(self, forecast: Forecast) -> None:
        take = min(STEPS_PER_DAY - self.kept, len(forecast.origins))
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


# --- plots: matplotlib figures without pyplot, so no backend or global state is touched ------
def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_mae_by_horizon(metrics: pd.DataFrame, path: str | Path, lead_minutes: np.ndarray) -> Path:
    """MAE per horizon: a thin line per member, a thick one for the ensemble."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for name, rows in metrics.groupby("model", sort=False):
        ours = name == ENSEMBLE
        ax.plot(lead_minutes[rows["horizon"].to_numpy() - 1], rows["mae"], marker="o",
                lw=2.5 if ours else 1.2, color="black" if ours else None, label=name, zorder=3 if ours else 2)
    ax.set(xlabel="minutes ahead", ylabel="MAE", title="MAE by horizon")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_sensors(readings: pd.DataFrame, forecasts: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """One panel per sensor: the readings and each forecast series over time."""
    sensors = list(readings.columns)
    fig = Figure(figsize=(9, 1.2 + 2.4 * len(sensors)), layout="constrained")
    axes = fig.subplots(len(sensors), 1, sharex=True, squeeze=False)[:, 0]
    for ax, sensor in zip(axes, sensors):
        ax.plot(readings.index, readings[sensor], color="black", lw=1.2, label="actual")
        for label, frame in forecasts.items():
            ax.plot(frame.index, frame[sensor], lw=1.0, label=label)
        ax.set(ylabel="speed", title=f"sensor {sensor}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    for label in axes[-1].get_xticklabels():
        label.set(rotation=30, horizontalalignment="right")
    return _save(fig, Path(path))


def adaptive_adjacency(model: GWNet) -> np.ndarray | None:
    """The model's learned ``softmax(relu(E1 E2))`` (``None`` without an adaptive adjacency)."""
    if model.adaptive is None:
        return None
    with torch.no_grad():
        return model.adaptive().float().cpu().numpy()


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


# --- one call: predict a split (or the latest window) into an output directory ---------------
@dataclass
class Report:
    """What :func:`run` wrote."""

    out: Path
    predictions: Path
    rows: int
    metrics: pd.DataFrame | None  # None for the latest window (no actuals)
    files: list[Path]


def split_windows(data: TrafficData, split: str) -> Windows:
    """The windows of ``split``; ``all`` spans train, validation and test."""
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
    """Column positions of ``sensors`` (default: the first three)."""
    ids = data.sensor_ids
    if not sensors:
        return list(range(min(3, len(ids))))
    where = {s: i for i, s in enumerate(ids)}
    unknown = [s for s in sensors if s not in where]
    if unknown:
        raise file_error(data.source, f"no sensor {unknown[0]!r} (it has {len(ids)} sensors, e.g. "
                         f"{', '.join(ids[:3])})")
    return [where[s] for s in sensors]


def run(ensemble: Ensemble, data: TrafficData, out: str | Path, split: str = "test", fmt: str = "csv",
        sensors: Sequence[str] | None = None, batch_size: int = 64, plots: bool = True) -> Report:
    """Fit ``ensemble`` on ``data``'s validation split if its strategy needs it, forecast
    ``split`` (or the ``latest`` window) and write the output directory described above."""
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
        ensemble.fit(split_windows(data, "val"), batch_size, source=data.source)
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
            files.append(plot_mae_by_horizon(metrics, out / "mae_by_horizon.png", ensemble.lead_minutes))
        files.append(plot_sensors(history, traces, out / "sensors.png"))
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
    trace = SensorTrace(index, ensemble.horizon)
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
    history = data.speeds.iloc[-STEPS_PER_DAY:, index].replace(ensemble.null_value, np.nan)
    future = pd.DataFrame(forecast.prediction[0][:, index].numpy(), index=forecast.target_times[0],
                          columns=history.columns)
    return rows, None, (history, {"forecast": future})
