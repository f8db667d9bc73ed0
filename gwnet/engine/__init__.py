"""Training and inference: the loop, the stage pipeline, loading and forecasting, listeners,
masked metrics, checkpoints and run directories.

``trainer`` (the loop) <- ``pipeline`` (stages, which trainer); ``inference`` (forecasts,
``load_trained``, ``evaluate``) needs neither. Nothing here imports :mod:`gwnet.scale` unless
a config asks for sharding.
"""
from .checkpoint import RunDir, load_checkpoint, save_checkpoint
from .device import autocast, resolve_device
from .inference import evaluate, forecast, load_trained, predict_batches, split_metrics
from .listeners import EpochListener
from .metrics import MetricAccumulator, masked_mae
from .pipeline import make_trainer, run_finished, train
from .trainer import Interrupted, RunResult, Trainer, build_model

__all__ = ["RunDir", "load_checkpoint", "save_checkpoint", "autocast", "resolve_device", "evaluate",
           "forecast", "load_trained", "predict_batches", "split_metrics", "EpochListener",
           "MetricAccumulator", "masked_mae", "make_trainer", "run_finished", "train", "Interrupted",
           "RunResult", "Trainer", "build_model"]
