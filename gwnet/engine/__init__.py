"""Training and evaluation: the loop, masked metrics, checkpoints and run directories."""
from .checkpoint import RunDir, load_checkpoint, save_checkpoint
from .metrics import MetricAccumulator, masked_mae
from .trainer import RunResult, Trainer, build_model, evaluate, load_trained, predict_batches, train

__all__ = ["RunDir", "load_checkpoint", "save_checkpoint", "MetricAccumulator", "masked_mae",
           "RunResult", "Trainer", "build_model", "evaluate", "load_trained", "predict_batches", "train"]
