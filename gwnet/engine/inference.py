"""Inference: forecasts in real units, metrics over a split, and trained runs loaded back.

Nothing here trains: prediction (``gwnet-predict``, the ensembles, the paper table) depends
on this module and the model registry, never on the training loop.
"""
from __future__ import annotations

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
from .checkpoint import RunDir, load_checkpoint
from .device import autocast, check_precision, resolve_device
from .metrics import MetricAccumulator


@torch.no_grad()
def forecast(model: torch.nn.Module, x: torch.Tensor, scaler: StandardScaler, t: TrainConfig,
             device: torch.device) -> torch.Tensor:
    """``(B, horizon, N)`` forecast in real units, clamped to the physical range, on the CPU."""
    with autocast(device, t.precision):
        out = model(x.to(device))
    return scaler.inverse_transform(out.float()).clamp(t.clamp_min, t.clamp_max).cpu()


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
    state = load_checkpoint(rd.best, map_location="cpu")  # the supports are built with scipy
    _check_trained_payload(rd.best, state)
    try:
        cfg = Config.from_dict(state["config"], source=str(rd.best))
    except GWNetError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise file_error(rd.best, f"checkpoint config is malformed ({' '.join(str(exc).split())[:160]})") from None
    try:
        scaler = StandardScaler(**state["scaler"])
    except TypeError as exc:
        raise file_error(rd.best, f"scaler is not a saved StandardScaler ({exc})") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (scaler.mean, scaler.std)):
        raise file_error(rd.best, f"scaler mean and std must be numbers, got {scaler.mean!r} and {scaler.std!r}")
    sensor_ids = list(state["sensor_ids"])
    supports = build_supports(state["adjacency"].numpy(), cfg.data.adjtype)
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
    return model.to(device).eval(), cfg, scaler, sensor_ids


# What load_trained needs of best.pt, and the type each entry must have.
TRAINED_KEYS = {"config": dict, "model": dict, "scaler": dict, "sensor_ids": (list, tuple),
                "adjacency": torch.Tensor}


def _check_trained_payload(path: Path, state: dict) -> None:
    """One line naming ``path`` for a missing or ill-typed entry of a trained run's checkpoint."""
    missing = [k for k in TRAINED_KEYS if k not in state]
    if missing:
        raise file_error(path, f"checkpoint lacks {', '.join(missing)} (not the best.pt of a gwnet run?)")
    wanted = {"config": "a table", "model": "a state_dict", "scaler": "a table", "sensor_ids": "a list",
              "adjacency": "a tensor"}
    for key, kind in TRAINED_KEYS.items():
        if not isinstance(state[key], kind):
            raise file_error(path, f"checkpoint entry {key!r} is a {type(state[key]).__name__}, not {wanted[key]}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise file_error(path, "checkpoint entry 'model' is not a state_dict (names to tensors)")
    ids = state["sensor_ids"]
    if not all(isinstance(s, str) for s in ids) or len(set(ids)) != len(ids):
        raise file_error(path, "checkpoint entry 'sensor_ids' must be distinct strings")
    adj = state["adjacency"]
    if adj.dim() != 2 or tuple(adj.shape) != (len(ids), len(ids)) or not adj.is_floating_point():
        raise file_error(path, f"checkpoint adjacency has shape {tuple(adj.shape)} ({adj.dtype}), expected "
                         f"{len(ids)} x {len(ids)} floats (one row per sensor id)")
    if not bool(torch.isfinite(adj).all()):
        raise file_error(path, "checkpoint adjacency holds NaN or infinite weights")


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
