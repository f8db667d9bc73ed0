"""Ensemble members: trained runs (any registered model) and reference checkpoints, and the
data windowed for all of them."""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import Config, DataConfig, TrainConfig, fields_with_role
from ..data import TrafficData, load_data
from ..data.datasets import load_latest
from ..data.scaler import StandardScaler
from ..engine.checkpoint import RunDir, load_checkpoint
from ..engine.inference import forecast, forecast_quantiles, load_trained
from ..engine.quantiles import median_index
from ..errors import GWNetError, file_error
from ..nn import load_reference_checkpoint

ENSEMBLE = "ensemble"  # the ensemble's name in metrics and plots
# Options that shape a member's input windows: members must agree on all of them (they may
# forecast different horizons).
WINDOW_FIELDS = fields_with_role(DataConfig, "window")
SOURCE_FIELDS = fields_with_role(DataConfig, "source")


@dataclass
class Member:
    """One model of an ensemble and what it needs to read windows: its own scaler and config."""

    name: str
    model: torch.nn.Module  # any registered model; a GWNet for reference checkpoints
    config: Config
    scaler: StandardScaler
    source: Path
    sensor_ids: list[str] | None = None  # None: a reference checkpoint, which follows the data
    val_mae: np.ndarray | None = field(default=None, repr=False)  # horizons 1..h, set by fit

    @property
    def horizon(self) -> int:
        return self.config.model.out_dim

    @property
    def levels(self) -> tuple[float, ...] | None:
        """The quantile levels of a quantile run; ``None`` for a point forecaster."""
        return self.config.model.quantiles or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, horizon, N)`` forecast in real units, clamped as evaluation clamps, on the CPU
        (a quantile run's median)."""
        return forecast(self.model, x, self.scaler, self.config.train, next(self.model.parameters()).device)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(point (B, horizon, N), quantiles (B, horizon, Q, N) or None)``, one forward pass."""
        out = forecast_quantiles(self.model, x, self.scaler, self.config.train,
                                 next(self.model.parameters()).device)
        if out.dim() == 4:
            return out[:, :, median_index(self.levels)], out
        return out, None


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
                          name: str | None = None, fill_zeroes: bool | None = None) -> Member:
    """A reference implementation's state_dict as a member on ``data``'s sensor graph.

    Such a file holds weights only: the member scales with ``data``'s own fitted scaler and
    evaluates with the default clamp range and missing-value marker. ``fill_zeroes`` (default:
    the data's setting) says whether its missing inputs become the mean or stay 0.
    """
    try:
        model = load_reference_checkpoint(path, adj=data.graph.adj, adjtype=data.config.adjtype)
    except GWNetError as exc:
        raise exc if str(exc).startswith(str(path)) else file_error(path, str(exc)) from None
    if model.config.in_dim != data.config.in_dim:
        raise file_error(path, f"takes {model.config.in_dim} input features, the data gives "
                         f"{data.config.in_dim} (time_of_day, day_of_week)")
    cfg = Config(data=copy.deepcopy(data.config), model=model.config, train=TrainConfig(clamp_max=data.clamp_max))
    cfg.data.horizon = model.config.out_dim
    if fill_zeroes is not None:
        cfg.data.fill_zeroes = fill_zeroes
    scaler = dataclasses.replace(data.scaler, fill_zeroes=cfg.data.fill_zeroes)
    return Member(name or Path(path).name, model.to(device), cfg, scaler, Path(path))


def load_members(paths: Sequence[str | Path], device: str | torch.device = "cpu", latest: bool = False,
                  fill_zeroes: bool | None = None, **source: str | None) -> tuple[list[Member], TrafficData]:
    """Members (run directories; files are reference checkpoints) and the data windowed for
    them: see :func:`data_config` for which data and ``source`` for replacing it.

    ``latest``: the data is only read to forecast after its last readings (it may hold just
    those, at least ``seq_len`` steps); without ``adj`` the graph is the one in the first
    run's ``best.pt``. Reference members still need the whole file (their scaler is fitted on
    its training split). ``fill_zeroes`` applies to reference members (runs keep their own)."""
    for path in paths:  # a dangling link or a loop of links: one line (Path.resolve would raise)
        if os.path.islink(path) and not os.path.exists(path):
            raise file_error(path, "is a symbolic link that leads nowhere (or a loop of links)")
    resolved = [Path(os.path.realpath(p)) for p in paths]
    for path, where in zip(paths, resolved):
        if resolved.count(where) > 1:
            raise file_error(path, "is given twice; each member once")
    names = dict(zip(map(str, paths), member_names(paths)))
    members = {str(p): load_member(p, device, names[str(p)]) for p in paths if not Path(p).is_file()}
    if members:
        check_compatible(list(members.values()))
    cfg = data_config(list(members.values()), **source)
    references = [p for p in paths if Path(p).is_file()]
    if fill_zeroes is not None and not members:
        cfg.fill_zeroes = fill_zeroes  # only references: the data's scaler is theirs
    if latest and members and not references:
        # The graph is the one in best.pt unless --adj names another (not the saved path).
        latest_cfg = dataclasses.replace(cfg, adj=source.get("adj"))
        return [members[str(p)] for p in paths], load_latest_data(list(members.values()), latest_cfg)
    data = load_ensemble_data(list(members.values()), cfg)
    for path in references:
        members[str(path)] = load_reference_member(path, data, device, names[str(path)], fill_zeroes)
    horizon = max(m.horizon for m in members.values())
    if horizon > cfg.horizon:
        # A reference forecasts further than the runs: window again, so every member sees the
        # same windows; references take the scaler fitted on the new windows.
        cfg.horizon = horizon
        data = TrafficData.from_frames(data.speeds, data.graph, cfg, source=data.source, protocol=data.protocol)
        for path in references:
            member = members[str(path)]
            member.scaler = dataclasses.replace(data.scaler, fill_zeroes=member.config.data.fill_zeroes)
    return [members[str(p)] for p in paths], data


def load_latest_data(members: Sequence[Member], cfg: DataConfig) -> TrafficData:
    """The readings of ``cfg`` for forecasting after their last step (see
    :func:`gwnet.data.datasets.load_latest`): the sensors, step and graph of the first run."""
    first = members[0]
    state = load_checkpoint(RunDir(first.source).best, map_location="cpu", kind="best")
    adjacency = state["adjacency"].numpy()
    return load_latest(cfg, list(state["sensor_ids"]), adjacency, first.scaler)


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
    return TrafficData.from_frames(data.speeds[expected], data.graph, cfg, source=data.source,
                                  protocol=data.protocol)

