"""gwnet: Graph WaveNet (original and improved) for spatio-temporal traffic forecasting.

The path a forecast takes: :mod:`gwnet.data` (file -> series -> window views -> batches),
:mod:`gwnet.models` (the registry: Graph WaveNet from :mod:`gwnet.nn`, an MLP baseline, your
own), :mod:`gwnet.engine` (training loop, stage pipeline, inference, listeners, metrics,
checkpoints), :mod:`gwnet.ensemble` (combining runs), :mod:`gwnet.scale` (sharded training,
8-bit optimizers) and :mod:`gwnet.cli` (the commands). :mod:`gwnet.config` holds every
option and :mod:`gwnet.registry` every name one can choose.
"""
from ._version import __version__
from .config import Config, DataConfig, GWNetConfig, ModelConfig, TrainConfig, opt
from .data import TrafficData, load_data
from .models import MLPConfig, build_model_from_config, register_model, unregister_model
from .engine import EpochListener, RunResult, Trainer, evaluate, load_trained, make_trainer, train
from .errors import GWNetError
from .nn import GWNet, load_for_more_horizons, load_reference_checkpoint
from .intervals import OnlineConformal

__all__ = [
    "__version__", "Config", "DataConfig", "GWNetConfig", "ModelConfig", "TrainConfig", "opt", "TrafficData",
    "load_data", "MLPConfig", "build_model_from_config", "register_model", "unregister_model",
    "EpochListener", "RunResult", "Trainer", "evaluate", "load_trained", "make_trainer", "train",
    "GWNetError", "GWNet", "load_for_more_horizons", "load_reference_checkpoint",
    "OnlineConformal", "predict_intervals",
]


def __getattr__(name: str):
    # predict_intervals lives with the ensembles (plots, tables): imported on first use, so
    # that ``import gwnet`` stays light.
    if name == "predict_intervals":
        from .ensemble.forecast_intervals import predict_intervals

        return predict_intervals
    raise AttributeError(f"module 'gwnet' has no attribute {name!r}")
