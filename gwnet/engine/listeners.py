"""Epoch listeners: what the training loop tells the world after each epoch.

The :class:`~gwnet.engine.trainer.Trainer` calls every listener's hooks on the main process:
:meth:`EpochListener.on_fit_start` once (after a resume has restored the history),
:meth:`~EpochListener.on_epoch_end` with each finished epoch's record, and
:meth:`~EpochListener.close` when fitting ends, normally or not. A record holds ``epoch``,
``train_mae``, ``train_rmse``, ``train_mape_pct``, ``grad_norm``, ``grad_norm_max``, ``val_mae``,
``val_rmse``, ``val_mape_pct``, ``lr`` and ``seconds`` (MAPE in %).

Built in, by name (:data:`gwnet.registry.LOGGERS`): ``csv`` writes ``metrics.csv`` (always
on: ``--resume`` relies on it), ``console`` prints one line per epoch (always on), ``tensorboard`` writes event files under ``RUN_DIR/tensorboard/``
(``--log tensorboard``; needs the ``tensorboard`` package). A new backend is one class here,
or anywhere, registered with ``@LOGGERS.register(name)``; a listener of one's own can also be
passed to the Trainer directly (``Trainer(cfg, listeners=[...])``).
"""
from __future__ import annotations

import sys
from typing import Any, Protocol

import pandas as pd
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..config import Config
from ..errors import GWNetError
from ..paths import check_not_link
from ..registry import LOGGERS
from .checkpoint import RunDir

Record = dict[str, Any]


class Trainer(Protocol):
    """What a listener sees of the :class:`~gwnet.engine.trainer.Trainer` (which imports this
    module): its config, run directory and progress (``epoch``, ``history``, best so far)."""

    cfg: Config
    run: RunDir
    progress: Any

ALWAYS_ON = ("csv", "console")


class EpochListener:
    """Hooks called by the training loop; override the ones you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch of this call to ``fit`` (``trainer.progress.history`` holds
        the epochs a resumed run had already done)."""

    def on_epoch_end(self, trainer: Trainer, record: Record, improved: bool) -> None:
        """After an epoch, once ``last.pt`` holds it; ``improved``: a new best validation MAE."""

    def close(self) -> None:
        """Fitting is over (finished, stopped early, interrupted or failed)."""


@LOGGERS.register("csv")
class MetricsCSV(EpochListener):
    """``metrics.csv``: the whole history, rewritten atomically after every epoch from the
    history in ``last.pt``, so a kill between the two leaves it at most an epoch behind and the
    next start repairs it."""

    def __init__(self, trainer: Trainer):
        self.path = trainer.run.metrics

    def _write(self, trainer: Trainer) -> None:
        with atomic_path(self.path) as tmp:
            pd.DataFrame(trainer.progress.history).to_csv(tmp, index=False)

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.progress.history:
            self._write(trainer)

    def on_epoch_end(self, trainer: Trainer, record: Record, improved: bool) -> None:
        self._write(trainer)


def announce(message: str) -> None:
    """A line about what training does (stages, resuming, early stopping) on standard error,
    through tqdm so that a progress bar stays intact. Callers decide whether to speak: the
    trainer does on the main process with ``train.progress`` only."""
    tqdm.write(message, file=sys.stderr)


@LOGGERS.register("console")
class ConsoleLines(EpochListener):
    """One line per epoch on standard output (through tqdm, so progress bars stay intact)."""

    def __init__(self, trainer: Trainer):
        self.epochs = trainer.cfg.train.epochs

    def on_epoch_end(self, trainer: Trainer, record: Record, improved: bool) -> None:
        tqdm.write(f"epoch {record['epoch']:3d}/{self.epochs}  train mae {record['train_mae']:.4f}  "
                   f"val mae {record['val_mae']:.4f}  lr {record['lr']:.2e}  {record['seconds']:.1f}s"
                   + ("  *" if improved else ""))


@LOGGERS.register("tensorboard")
class TensorBoard(EpochListener):
    """TensorBoard scalars per epoch under ``RUN_DIR/tensorboard/``: ``train/mae``, ``rmse``,
    ``mape_pct`` and the same under ``val/``, ``lr``, ``grad_norm`` and ``grad_norm_max``, at step =
    epoch. A resumed run purges the steps after its checkpoint, so a kill never leaves an
    epoch twice in the curves."""

    TAGS = {"train_mae": "train/mae", "train_rmse": "train/rmse", "train_mape_pct": "train/mape_pct",
            "val_mae": "val/mae", "val_rmse": "val/rmse", "val_mape_pct": "val/mape_pct", "lr": "lr",
            "grad_norm": "grad_norm", "grad_norm_max": "grad_norm_max"}

    def __init__(self, trainer: Trainer):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GWNetError("--log tensorboard needs the tensorboard package "
                             "(pip install 'gwnet[tensorboard]')") from None
        self._writer_class = SummaryWriter
        self.log_dir = trainer.run.tensorboard
        check_not_link(self.log_dir)  # a file or a link there: one line, before any training
        self.writer = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=trainer.progress.epoch + 1)

    def on_epoch_end(self, trainer: Trainer, record: Record, improved: bool) -> None:
        for key, tag in self.TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, float(record[key]), global_step=int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def make_listeners(trainer: Trainer) -> list[EpochListener]:
    """The listeners a run's config asks for: ``csv`` and ``console`` always (``train.progress``
    only turns the progress bar off), then each name of ``train.log``, each once."""
    t = trainer.cfg.train
    names = [*ALWAYS_ON, *t.loggers()]
    return [LOGGERS.get_entry(name, hint=" (train.log)")(trainer) for name in dict.fromkeys(names)]
