"""Epoch listeners: a custom listener sees every epoch, metrics.csv and the console lines are
listeners, TensorBoard event files hold the per-epoch scalars (read back with tensorboard's
own reader) and a resumed run does not log an epoch twice."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from gwnet.config import Config
from gwnet.engine import EpochListener, RunDir, Trainer, train
from gwnet.errors import GWNetError
from gwnet.registry import LOGGERS


def tiny(data: Path, out: Path, epochs: int = 3, **train_options) -> Config:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(data)
    cfg.out = str(out)
    m = cfg.model
    m.residual_channels = m.dilation_channels = m.skip_channels = m.end_channels = 8
    cfg.train.epochs, cfg.train.batches_per_epoch, cfg.train.batch_size = epochs, 2, 16
    cfg.train.progress = False
    for k, v in train_options.items():
        setattr(cfg.train, k, v)
    return cfg


class Recorder(EpochListener):
    def __init__(self, stop_after: int | None = None):
        self.calls: list[str] = []
        self.records: list[dict] = []
        self.stop_after = stop_after

    def on_fit_start(self, trainer):
        self.calls.append(f"start@{trainer.progress.epoch}")

    def on_epoch_end(self, trainer, record, improved):
        self.calls.append("epoch")
        self.records.append(dict(record, improved=improved))
        if record["epoch"] == self.stop_after:
            raise KeyboardInterrupt

    def close(self):
        self.calls.append("close")


def test_custom_listener_receives_every_epoch_and_metrics_csv_agrees(tiny_dataset, tmp_path):
    rec = Recorder()
    result = train(tiny(tiny_dataset, tmp_path / "run"), listeners=[rec])
    assert rec.calls == ["start@0", "epoch", "epoch", "epoch", "close"]
    assert [r["epoch"] for r in rec.records] == [1, 2, 3]
    csv = pd.read_csv(RunDir(result.run_dir).metrics)
    keys = ["train_mae", "train_rmse", "train_mape_pct", "grad_norm", "grad_norm_max", "val_mae", "val_rmse",
            "val_mape_pct", "lr", "seconds"]
    for key in keys:
        assert csv[key].tolist() == pytest.approx([r[key] for r in rec.records]), key
    best = min(range(3), key=lambda i: rec.records[i]["val_mae"])
    assert rec.records[best]["improved"] and result.best_epoch == best + 1


def test_listeners_close_on_interruption_and_resume_continues_the_epochs(tiny_dataset, tmp_path):
    cfg = tiny(tiny_dataset, tmp_path / "run")
    first = Recorder(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, listeners=[first])
    assert first.calls == ["start@0", "epoch", "close"]
    second = Recorder()
    train(cfg, resume=True, listeners=[second])
    assert second.calls == ["start@1", "epoch", "epoch", "close"]
    assert [r["epoch"] for r in second.records] == [2, 3]


def test_console_lines_are_the_console_listener_with_or_without_progress_bars(tiny_dataset, tmp_path, capsys):
    for name, progress in (("quiet", False), ("loud", True)):  # progress only turns the bar off
        train(tiny(tiny_dataset, tmp_path / name, progress=progress))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
        assert len(lines) == 3 and "val mae" in lines[0]


def test_unknown_logger_is_a_one_line_error(tiny_dataset, tmp_path):
    with pytest.raises(GWNetError, match=r"unknown logger 'wandb'; choose one of .*tensorboard"):
        Trainer(tiny(tiny_dataset, tmp_path / "run", log="wandb"))


def test_missing_tensorboard_fails_before_training(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(GWNetError, match=r"needs the tensorboard package"):
        Trainer(tiny(tiny_dataset, tmp_path / "run", log="tensorboard"))
    assert not RunDir(tmp_path / "run").last.exists()


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_files_hold_every_epoch_once_across_a_resume(tiny_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    assert "tensorboard" in LOGGERS
    cfg = tiny(tiny_dataset, tmp_path / "run", log="tensorboard")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, listeners=[Recorder(stop_after=2)])
    result = train(cfg, resume=True)
    run = RunDir(result.run_dir)
    found = scalars(run.tensorboard)
    csv = pd.read_csv(run.metrics)
    expected = {"train/mae": "train_mae", "train/rmse": "train_rmse", "train/mape_pct": "train_mape_pct",
                "val/mae": "val_mae", "val/rmse": "val_rmse", "val/mape_pct": "val_mape_pct", "lr": "lr",
                "grad_norm": "grad_norm", "grad_norm_max": "grad_norm_max"}
    assert set(expected) <= set(found)
    for tag, column in expected.items():
        steps = [s for s, _ in found[tag]]
        assert steps == [1, 2, 3], (tag, steps)
        assert [v for _, v in found[tag]] == pytest.approx(csv[column].tolist(), rel=1e-5), tag
