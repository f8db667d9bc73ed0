"""A trained run as one self-contained file: ``torch.export`` (``.pt2``) or ONNX.

The exported program takes the raw input window and returns the forecast in the data's unit,
so that the file alone forecasts (no gwnet, no scaler, no graph file)::

    x         (batch, seq_len, N, F) float32: feature 0 the reading in the data's unit
              (``null_value``, 0 by default, where missing), then the calendar features of
              the run (time of day as a fraction of a day; a one-hot day of week, Monday first)
    forecast  (batch, horizon, N) float32: the next steps, clamped to the run's range

Inside: the run's scaling of the readings (missing ones become the training mean when the run
fills zeroes), the model, the inverse scaling and the clamp, exactly what ``gwnet-predict``
computes. Graph WaveNet is exported with its graph convolutions in the ``dense`` kernel (the
same function and parameters as ``fast``; see :class:`gwnet.nn.graph_conv.DiffusionGraphConv`)
and every support, the adaptive adjacency included, frozen as a dense :math:`N \\times N`
constant: sparse (CSR) tensors and the ``topk`` adjacency's sparse products cannot be traced
by ``torch.export`` nor written as ONNX. The adjacency is fixed once trained, so freezing it
changes nothing but the rounding; a graph whose dense supports would exceed
:data:`MAX_DENSE_SUPPORT_BYTES` is refused in one line.

The metadata (:func:`export_metadata`: sensor ids, step, horizons, minutes ahead, unit,
protocol, input layout, scaler, clamp, and the largest difference from the run's own forecast
measured at export) travels inside the file: as the extra file ``gwnet.json`` of a ``.pt2``
(``torch.export.load(path, extra_files={"gwnet.json": ""})``), as the metadata property
``gwnet`` of an ONNX model (``onnxruntime.InferenceSession(path).get_modelmeta()
.custom_metadata_map["gwnet"]``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .._version import __version__
from ..atomic import atomic_path
from ..config import Config
from ..data import build_supports
from ..data.scaler import StandardScaler
from ..data.windows import calendar_features
from ..errors import GWNetError, file_error, one_line
from ..models import build_model_from_config
from .checkpoint import RunDir, load_checkpoint
from .inference import forecast_quantiles, load_trained

FORMATS = ("pt2", "onnx")
EXPORT_FORMAT = "gwnet-export"
EXPORT_VERSION = 1
METADATA_KEY = "gwnet"  # ONNX metadata property; the .pt2 extra file is METADATA_KEY + ".json"
# The dense supports an exported file may hold: ONNX keeps a model in one protobuf of at most
# 2 GiB, and a file that size forecasts slower than the run itself would.
MAX_DENSE_SUPPORT_BYTES = 1 << 30
# The largest difference from the run's own forecast an export may show (in the data's unit,
# relative to the scaler's std): float32 rounding of the reordered products stays far below.
TOLERANCE = 1e-4


class ExportedForecaster(nn.Module):
    """Raw window in, forecast in real units out: scaling, the model, inverse scaling, clamp."""

    def __init__(self, model: nn.Module, scaler: StandardScaler, clamp_min: float, clamp_max: float | None):
        super().__init__()
        self.model = model
        self.mean, self.std, self.fill_zeroes = float(scaler.mean), float(scaler.std), bool(scaler.fill_zeroes)
        self.clamp_min = float(clamp_min)
        self.clamp_max = None if clamp_max is None or math.isinf(clamp_max) else float(clamp_max)

    def forward(self, x: Tensor) -> Tensor:
        reading = x[..., :1]
        if self.fill_zeroes:
            reading = torch.where(reading == 0, torch.full_like(reading, self.mean), reading)
        scaled = torch.cat([(reading - self.mean) / self.std, x[..., 1:]], dim=-1)
        out = (self.model(scaled) * self.std + self.mean).clamp(min=self.clamp_min, max=self.clamp_max)
        # A quantile model's (B, H, Q, N), sorted along Q as gwnet sorts it (no crossing).
        return out.sort(dim=2).values if out.dim() == 4 else out


class _FrozenSupports(nn.Module):
    """What a Graph WaveNet's ``supports()`` returns, computed once and held as dense buffers."""

    def __init__(self, supports: list[Tensor]):
        super().__init__()
        self.count = len(supports)
        for i, s in enumerate(supports):
            self.register_buffer(f"support_{i}", s.detach().contiguous())

    def forward(self) -> list[Tensor]:
        return [getattr(self, f"support_{i}") for i in range(self.count)]


def _dense(support) -> Tensor:
    if isinstance(support, Tensor):
        return support.to_dense() if support.layout != torch.strided else support
    return support.dense()  # a topk or lowrank adjacency's support object


def exportable_model(run_dir: str | Path, model: nn.Module, cfg: Config, adjacency: np.ndarray) -> nn.Module:
    """``model`` in a form ``torch.export`` traces and ONNX can hold: for Graph WaveNet the
    same weights in the ``dense`` kernel with every support frozen dense (see the module
    docstring); any other registered model as it is."""
    from ..nn.model import GWNet

    if not isinstance(model, GWNet):
        return model
    n = cfg.model.num_nodes
    count = model.num_fixed + int(model.adaptive is not None)
    needed = count * n * n * 4
    if needed > MAX_DENSE_SUPPORT_BYTES:
        raise file_error(run_dir, f"cannot be exported: its {count} graph supports over {n} sensors take "
                         f"{needed / 2**30:.1f} GiB as dense matrices (sparse and {cfg.model.adaptive} "
                         f"adjacencies cannot be traced), above the {MAX_DENSE_SUPPORT_BYTES / 2**30:.0f} GiB "
                         "an exported file may hold; serve the run with gwnet-serve instead")
    dense_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, graph_conv="dense"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        rebuilt = build_model_from_config(dense_cfg, build_supports(adjacency, cfg.data.adjtype))
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.eval()
        with torch.no_grad():
            frozen = [_dense(s).float() for s in rebuilt.supports()]
    # The frozen copies replace what they were computed from (held once in the file).
    for i in range(rebuilt.num_fixed):
        delattr(rebuilt, f"support_{i}")
    rebuilt.adaptive = None
    holder = _FrozenSupports(frozen)
    rebuilt.frozen_supports = holder  # a child module: its buffers are the program's constants
    rebuilt.supports = holder.forward  # what forward() asks for, now constants
    return rebuilt


def feature_names(cfg: Config) -> list[str]:
    """Names of the input features, in order."""
    names = ["reading"]
    if cfg.data.time_of_day:
        names.append("time_of_day")
    if cfg.data.day_of_week:
        names += [f"day_of_week_{d}" for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")]
    return names


def export_metadata(cfg: Config, scaler: StandardScaler, sensor_ids: list[str], run_dir: str | Path,
                    fmt: str) -> dict:
    """Everything needed to build an input and read the output of the exported file."""
    d, t = cfg.data, cfg.train
    step = d.step_minutes or 5
    horizon = cfg.model.out_dim
    names = feature_names(cfg)
    levels = getattr(cfg.model, "quantiles", None)
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "gwnet_version": __version__,
        "file_format": fmt, "model": cfg.arch, "run": Path(run_dir).name,
        "sensor_ids": list(sensor_ids), "num_sensors": len(sensor_ids),
        "step_minutes": step, "seq_len": d.seq_len, "horizon": horizon, "first_offset": d.first_offset,
        "minutes_ahead": [(d.first_offset + h) * step for h in range(horizon)],
        "target": d.target, "unit": d.unit, "protocol": d.protocol,
        "input": {"name": "x", "dtype": "float32", "shape": ["batch", d.seq_len, len(sensor_ids), len(names)],
                  "features": names, "missing_reading": t.null_value,
                  "layout": "x[b, s, n, 0] is the reading of sensor_ids[n] at the s-th of seq_len steps "
                            f"{step} minutes apart, oldest first; time_of_day is (time - midnight) / 1 day; "
                            "day_of_week is one-hot, Monday first"},
        "output": ({"name": "forecast", "dtype": "float32", "shape": ["batch", horizon, len(sensor_ids)],
                    "layout": "forecast[b, h, n]: sensor_ids[n] at minutes_ahead[h] after the newest input step"}
                   if levels is None else
                   {"name": "forecast", "dtype": "float32",
                    "shape": ["batch", horizon, len(levels), len(sensor_ids)], "quantile_levels": list(levels),
                    "layout": "forecast[b, h, q, n]: quantile_levels[q] of sensor_ids[n] at minutes_ahead[h] "
                              "after the newest input step"}),
        "scaler": scaler.to_dict(), "clamp": [t.clamp_min, t.clamp_max], "null_value": t.null_value,
        "precision": "fp32", "trained_precision": t.precision,
    }


def sample_input(cfg: Config, scaler: StandardScaler, num_sensors: int, batch: int = 2,
                 seed: int = 0) -> Tensor:
    """Plausible raw windows to check an export with: readings around the training mean (a few
    missing), the calendar of consecutive steps."""
    rng = np.random.default_rng(seed)
    step = pd.Timedelta(minutes=cfg.data.step_minutes or 5)
    windows = []
    for b in range(batch):
        index = pd.date_range(pd.Timestamp("2012-03-01 07:00") + b * 37 * step, periods=cfg.data.seq_len, freq=step)
        reading = np.maximum(scaler.mean + scaler.std * rng.standard_normal((len(index), num_sensors)), 0.0)
        reading[rng.random(reading.shape) < 0.05] = cfg.train.null_value
        calendar = calendar_features(index, cfg.data.time_of_day, cfg.data.day_of_week)
        calendar = np.broadcast_to(calendar[:, None, :], (len(index), num_sensors, calendar.shape[1]))
        windows.append(np.concatenate([reading[..., None], calendar], axis=-1))
    return torch.from_numpy(np.stack(windows).astype(np.float32))


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise file_error(out, "is a directory; --out names the file to write")
    if out.exists() and not overwrite:
        raise file_error(out, "already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise file_error(out.parent, "no such directory")


def export_run(run_dir: str | Path, out: str | Path, fmt: str, overwrite: bool = False) -> dict:
    """Export ``run_dir``'s best model to ``out`` (``pt2`` or ``onnx``), check the file's
    forecast against the run's own and return the metadata (with ``max_abs_difference``)."""
    if fmt not in FORMATS:
        raise GWNetError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_target(out, overwrite)
    if fmt == "onnx":
        _onnx_modules(out)  # before the work: the extra may be missing
    model, cfg, scaler, sensor_ids = load_trained(run_dir, "cpu")
    adjacency = load_checkpoint(RunDir(run_dir).best, map_location="cpu")["adjacency"].numpy()
    wrapped = ExportedForecaster(exportable_model(run_dir, model, cfg, adjacency), scaler,
                                 cfg.train.clamp_min, cfg.train.clamp_max).eval()
    meta = export_metadata(cfg, scaler, sensor_ids, run_dir, fmt)
    x = sample_input(cfg, scaler, len(sensor_ids))
    # The run's whole output: a quantile run's every quantile, not only its median.
    expected = forecast_quantiles(model, _scaled(x, scaler), scaler, cfg.train, torch.device("cpu"))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")  # the exporters' deprecation notes are not the user's to act on
        try:
            program = torch.export.export(wrapped, (x,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # noqa: BLE001 - what the tracer could not follow, in one line
            raise file_error(run_dir, f"torch.export cannot trace its {cfg.arch} model: "
                             f"{one_line(exc)}") from None
        if fmt == "pt2":
            got = program.module()(x)
            meta["max_abs_difference"] = float((got - expected).abs().max())
            _check_difference(run_dir, meta, scaler, cfg)
            buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2, or a buffer
            torch.export.save(program, buffer, extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
            with atomic_path(out) as tmp:
                tmp.write_bytes(buffer.getvalue())
        else:
            meta["max_abs_difference"] = _write_onnx(program, out, x, expected, meta, run_dir, scaler, cfg)
    return meta


def _scaled(x: Tensor, scaler: StandardScaler) -> Tensor:
    """The model input of raw windows ``x``, as :meth:`TrafficData.latest` scales them."""
    x = x.clone()
    x[..., 0] = scaler.transform(x[..., 0])
    return x


def _check_difference(run_dir, meta: dict, scaler: StandardScaler, cfg: Config) -> None:
    limit = TOLERANCE * max(1.0, abs(scaler.std))
    if cfg.train.precision == "fp32" and not meta["max_abs_difference"] <= limit:
        raise file_error(run_dir, f"the exported {meta['file_format']} forecast differs from the run's by "
                         f"{meta['max_abs_difference']:.3g}, above {limit:.3g}; nothing was written")


def _onnx_modules(out: Path):
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise file_error(out, f"ONNX export needs onnxscript and onnxruntime (pip install 'gwnet[export]'): "
                         f"{exc}") from None
    import onnxruntime
    return onnxruntime


def _write_onnx(program, out: Path, x: Tensor, expected: Tensor, meta: dict, run_dir, scaler, cfg) -> float:
    ort = _onnx_modules(out)
    try:
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, input_names=["x"],
                                         output_names=["forecast"], external_data=False, verbose=False)
    except Exception as exc:  # noqa: BLE001
        raise file_error(run_dir, f"torch's ONNX exporter cannot convert its {cfg.arch} model: "
                         f"{one_line(exc)}") from None
    # Checked in memory first, so that the file is written once, with the checked figure in it.
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["forecast"], {"x": x.numpy()})[0]
    meta["max_abs_difference"] = float(np.abs(got - expected.numpy()).max())
    _check_difference(run_dir, meta, scaler, cfg)
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    with atomic_path(out) as tmp:
        onnx_program.save(tmp, external_data=False)
    return meta["max_abs_difference"]


@contextlib.contextmanager
def _quiet_loggers():
    """The exporters log progress and notes on optional packages (torchvision) that are not
    the user's to act on; errors still show."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

