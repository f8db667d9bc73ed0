"""Inference: forecasts in real units, metrics over a split, and trained runs loaded back.

Nothing here trains: prediction (``gwnet-predict``, the ensembles, the paper table) depends
on this module and the model registry, never on the training loop.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from ..config import Config, DataConfig, TrainConfig, fields_with_role
from ..data import TrafficData, build_supports, load_data
from ..data.scaler import StandardScaler
from ..data.windows import Windows
from ..errors import GWNetError, file_error
from ..models import build_model_from_config
from ..models.quantiles import quantile_levels
from .checkpoint import RunDir, load_checkpoint
from .device import autocast, check_precision, place, resolve_device
from .metrics import MetricAccumulator
from .quantiles import median_index


@torch.no_grad()
def forecast(model: torch.nn.Module, x: torch.Tensor, scaler: StandardScaler, t: TrainConfig,
             device: torch.device) -> torch.Tensor:
    """``(B, horizon, N)`` forecast in real units, clamped to the physical range, on the CPU;
    a quantile model's median (:func:`forecast_quantiles` gives all its quantiles)."""
    out = forecast_quantiles(model, x, scaler, t, device)
    return out[:, :, median_index(quantile_levels(model))] if out.dim() == 4 else out


@torch.no_grad()
def forecast_quantiles(model: torch.nn.Module, x: torch.Tensor, scaler: StandardScaler, t: TrainConfig,
                       device: torch.device) -> torch.Tensor:
    """The model's whole output in real units, clamped, on the CPU: ``(B, H, N)`` for a point
    model, ``(B, H, Q, N)`` for a quantile model, its quantiles sorted along ``Q`` (so that
    they never cross: the rearrangement of Chernozhukov et al., which only lowers the pinball
    loss)."""
    with autocast(device, t.precision):
        out = model(x.to(device))
    out = scaler.inverse_transform(out.float()).clamp(t.clamp_min, t.clamp_max).cpu()
    return out.sort(dim=2).values if out.dim() == 4 else out


def predict_batches(model: torch.nn.Module, windows: Windows, scaler: StandardScaler, t: TrainConfig,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(forecast, target)`` per batch of a split (see :func:`forecast`)."""
    model.eval()
    for x, y in windows.batches(t.batch_size, scaler=scaler):
        yield forecast(model, x, scaler, t, device), y


def split_metrics(model: torch.nn.Module, windows: Windows, scaler: StandardScaler, t: TrainConfig,
                  device: torch.device) -> MetricAccumulator:
    """Clamped, masked metrics of ``model`` over every window of a split."""
    acc = MetricAccumulator(windows.horizon, t.null_value)
    for pred, y in predict_batches(model, windows, scaler, t, device):
        acc.update(pred, y)
    return acc


def load_trained(run_dir: str | Path,
                 device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, StandardScaler, list[str]]:
    """Rebuild the model of a run directory: ``(model in eval mode, config, scaler, sensor ids)``.

    The model is built by its registered builder (the checkpoint records the model's name and
    config), so any registered model loads, Graph WaveNet or a user's own.
    """
    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise file_error(rd.root, "no such run directory")
    state = load_checkpoint(rd.best, map_location="cpu", kind="best")  # the supports are built with scipy
    cfg = Config.from_dict(state["config"], source=str(rd.best))  # checked by load_checkpoint
    scaler = StandardScaler(**state["scaler"])
    sensor_ids = list(state["sensor_ids"])
    supports = build_supports(state["adjacency"].numpy(), cfg.data.adjtype)
    check_weights_fit(rd.best, cfg, supports, state["model"])
    try:
        model = build_model_from_config(cfg, supports)
    except GWNetError as exc:
        raise file_error(rd.best, f"cannot rebuild its model: {exc}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise file_error(rd.best, f"weights do not fit the {cfg.arch} model its config describes: {reason}") from None
    device = resolve_device(device)
    check_precision(device, cfg.train.precision)  # its forecasts run in the run's precision
    place(model, device)
    return model.eval(), cfg, scaler, sensor_ids


def check_weights_fit(path: Path, cfg: Config, supports, weights: dict) -> None:
    """The weights a checkpoint holds must be those of the model its config describes, name for
    name and shape for shape. Compared on the meta device, before the model is built: a config
    edited to a million channels is refused here instead of allocating them."""
    meta = copy.deepcopy(cfg)
    if hasattr(meta.model, "graph_conv"):
        meta.model.graph_conv = "dense"  # the same weights; this kernel never reads the supports' values
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_model_from_config(meta, supports).state_dict().items()}
    except GWNetError as exc:
        raise file_error(path, f"cannot rebuild its model: {exc}") from None
    except RuntimeError:  # a model whose construction needs values: load_state_dict compares
        return
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    for name in sorted(set(shapes) | set(theirs)):
        if shapes.get(name) != theirs.get(name):
            raise file_error(path, f"weights do not fit the {cfg.arch} model its config describes: {name!r} is "
                             f"{theirs.get(name, 'missing')} in the file, {shapes.get(name, 'unknown')} in the model")


def evaluate(run_dir: str | Path, data: DataConfig | TrafficData | None = None, split: str = "test",
             device: str = "auto") -> pd.DataFrame:
    """Per-horizon test metrics (plus the mean row) of a run's best model on ``data``.

    ``data`` defaults to the data the run was trained on; a :class:`DataConfig` or a loaded
    :class:`TrafficData` evaluates on other readings of the same sensors, scaled as in training.
    """
    device = resolve_device(device)
    model, cfg, scaler, sensor_ids = load_trained(run_dir, device)
    # The windows and features the model was trained on: every data option of these roles.
    shaping = fields_with_role(DataConfig, "window", "horizon")
    if not isinstance(data, TrafficData):
        window = {name: getattr(cfg.data, name) for name in shaping}
        data = load_data(dataclasses.replace(data or cfg.data, **window), scaler=scaler)
    elif any(getattr(data.config, name) != getattr(cfg.data, name) for name in shaping):
        raise GWNetError(f"{data.source}: windows or features differ from those of run {run_dir}")
    if data.sensor_ids != sensor_ids:
        raise GWNetError(f"{data.source}: sensors differ from those of run {run_dir}")
    return split_metrics(model, data.windows[split], scaler, cfg.train, device).table()
