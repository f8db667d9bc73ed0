"""gwnet: Graph WaveNet (original and improved) for spatio-temporal traffic forecasting.

The path a forecast takes: :mod:`gwnet.data` (file -> series -> window views -> batches),
:mod:`gwnet.nn` (the model), :mod:`gwnet.engine` (training, metrics, checkpoints),
:mod:`gwnet.ensemble` (combining runs), :mod:`gwnet.scale` (sharded training, 8-bit
optimizers) and :mod:`gwnet.cli` (the commands). :mod:`gwnet.config` holds every option.
"""
__version__ = "0.1.0"

from .config import Config, DataConfig, GWNetConfig, TrainConfig  # noqa: E402
from .data import TrafficData, load_data  # noqa: E402
from .engine import RunResult, Trainer, evaluate, load_trained, train  # noqa: E402
from .errors import GWNetError  # noqa: E402
from .nn import GWNet, load_for_more_horizons, load_reference_checkpoint  # noqa: E402

__all__ = [
    "Config", "DataConfig", "GWNetConfig", "TrainConfig", "TrafficData", "load_data", "RunResult",
    "Trainer", "evaluate", "load_trained", "train", "GWNetError", "GWNet", "load_for_more_horizons",
    "load_reference_checkpoint",
]
