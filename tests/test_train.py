"""Training engine and gwnet-train: run directories, resume, pretraining, loss, early stopping."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from gwnet.config import Config
from gwnet.data import load_data
from gwnet.engine import RunDir, Trainer, load_checkpoint, load_trained, masked_mae, train
from gwnet.engine.baselines import evaluate_baseline, last_value
from gwnet.engine.metrics import MetricAccumulator
from gwnet.errors import GWNetError


def tiny_config(dataset, out, **train) -> Config:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(dataset)
    cfg.out = str(out)
    m = cfg.model
    m.residual_channels = m.dilation_channels = 8
    m.skip_channels = m.end_channels = 16
    m.blocks, m.layers, m.apt_size = 2, 2, 4
    cfg.train.epochs = 2
    cfg.train.batch_size = 32
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_masked_mae_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, 0.0], [1.0, 4.0]])
    assert masked_mae(pred, target).item() == pytest.approx((1 + 2 + 0) / 3)
    assert masked_mae(pred, torch.zeros(2, 2)).item() == 0.0


def test_metric_accumulator_by_hand():
    acc = MetricAccumulator(horizon=2)
    pred = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])  # (B=1, H=2, N=2)
    target = torch.tensor([[[2.0, 0.0], [4.0, 10.0]]])
    acc.update(pred, target)
    table = acc.table()
    assert table.loc["1", "mae"] == pytest.approx(1.0)
    assert table.loc["2", "mae"] == pytest.approx(3.0)
    assert table.loc["2", "rmse"] == pytest.approx(np.sqrt((1 + 25) / 2))
    assert table.loc["2", "mape_pct"] == pytest.approx(100 * (1 / 4 + 5 / 10) / 2)
    assert table.loc["mean", "mae"] == pytest.approx(2.0)


def test_last_value_baseline_skips_missing():
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 2, 1)
    pred = last_value(x, horizon=2, fallback=50.0)
    assert pred.shape == (1, 2, 2)
    assert pred[0, :, 0].tolist() == [4.0, 4.0] and pred[0, :, 1].tolist() == [50.0, 50.0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, request):
    from gwnet.data import synthetic

    root = tmp_path_factory.mktemp("train")
    synthetic.write(root / "data", nodes=6, days=3, seed=1)
    cfg = tiny_config(root / "data", root / "run", epochs=3)
    result = train(cfg)
    return root, cfg, result


def test_run_directory_contract(finished_run):
    root, cfg, result = finished_run
    rd = RunDir(result.run_dir)
    saved = json.loads(rd.config.read_text())
    assert saved["model"]["num_nodes"] == 6 and saved["data"]["horizon"] == 12
    assert Config.from_dict(saved).to_dict() == saved
    best = load_checkpoint(rd.best)
    assert {"model", "config", "scaler", "sensor_ids", "epoch", "val_mae", "format_version"} <= set(best)
    last = load_checkpoint(rd.last)
    assert {"optimizer", "scheduler", "torch_rng", "shuffle_rng", "bad_epochs", "finished"} <= set(last)
    assert last["finished"]
    history = pd.read_csv(rd.metrics)
    assert list(history["epoch"]) == [1, 2, 3]
    assert {"train_mae", "val_mae", "val_rmse", "val_mape_pct", "lr", "seconds"} <= set(history.columns)
    np.testing.assert_allclose(history["lr"], [1e-3, 0.97e-3, 0.97**2 * 1e-3])
    test = pd.read_csv(rd.test_metrics, index_col=0)
    assert list(test.index) == [str(h) for h in range(1, 13)] + ["mean"]
    assert best["val_mae"] == pytest.approx(history["val_mae"].min())
    model, cfg2, scaler, ids = load_trained(rd.root)
    assert ids == best["sensor_ids"] and not model.training


def test_evaluate_matches_run(finished_run):
    from gwnet import evaluate

    root, cfg, result = finished_run
    table = evaluate(result.run_dir)
    pd.testing.assert_frame_equal(table, pd.read_csv(RunDir(result.run_dir).test_metrics, index_col=0),
                                  check_dtype=False, check_index_type=False, atol=1e-5)


def test_resume_of_finished_or_foreign_run(finished_run, tmp_path):
    root, cfg, result = finished_run
    with pytest.raises(GWNetError, match="already finished"):
        train(cfg, resume=True)
    with pytest.raises(GWNetError, match="already holds a run"):
        train(cfg)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "last.pt").write_bytes(b"not a checkpoint")
    cfg2 = tiny_config(root / "data", foreign)
    with pytest.raises(GWNetError, match="not a readable checkpoint"):
        train(cfg2, resume=True)


def test_interrupt_and_resume_equals_uninterrupted(finished_run, tmp_path):
    root, cfg, result = finished_run
    cfg_b = tiny_config(root / "data", tmp_path / "b", epochs=3)
    calls = {"n": 0}
    trainer = Trainer(cfg_b)
    per_epoch = trainer.data.windows["train"].num_batches(cfg_b.train.batch_size)

    def interrupting_loss(pred, target, null_value):
        calls["n"] += 1
        if calls["n"] == per_epoch + 2:  # mid-epoch 2
            trainer._stop_signal = signal.SIGTERM
        return masked_mae(pred, target, null_value)

    trainer.loss_fn = interrupting_loss
    from gwnet.engine.trainer import Interrupted

    with pytest.raises(Interrupted):
        trainer.fit()
    state = load_checkpoint(RunDir(cfg_b.out).last)
    assert state["epoch"] == 1 and state["partial"]["next_batch"] == 2 and not state["finished"]
    resumed = train(cfg_b, resume=True)
    a = load_checkpoint(RunDir(result.run_dir).best)["model"]
    b = load_checkpoint(RunDir(resumed.run_dir).best)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    pd.testing.assert_frame_equal(resumed.test_metrics, result.test_metrics)


def test_pretrain_then_finetune(finished_run, tmp_path):
    root, _, _ = finished_run
    cfg = tiny_config(root / "data", tmp_path / "ft", epochs=1, pretrain_horizon=4)
    result = train(cfg)
    pre = RunDir(tmp_path / "ft" / "pretrain-h4")
    assert pd.read_csv(pre.test_metrics, index_col=0).shape[0] == 5
    assert pd.read_csv(RunDir(result.run_dir).test_metrics, index_col=0).shape[0] == 13
    fine_cfg = json.loads(RunDir(result.run_dir).config.read_text())
    assert fine_cfg["train"]["init_from"] == str(pre.root)
    # the finetuned model started from the pretrained weights: check the surgery directly
    data = load_data(Config.from_dict(fine_cfg).data)
    from gwnet.engine.trainer import build_model, init_from_run

    fresh_cfg = Config.from_dict(fine_cfg).resolve(data.num_nodes)
    model = build_model(fresh_cfg, data)
    init_from_run(model, fresh_cfg, data, pre.root)
    pre_state = load_checkpoint(pre.best)["model"]
    end = [k for k in pre_state if pre_state[k].shape != model.state_dict()[k].shape]
    assert end, "the output layer should have grown"
    for k in end:
        torch.testing.assert_close(model.state_dict()[k][:4], pre_state[k])
    with pytest.raises(GWNetError, match="already finished"):
        train(cfg, resume=True)


def test_init_from_mismatched_graph_is_refused(finished_run, tmp_path):
    from gwnet.data import synthetic

    root, _, result = finished_run
    synthetic.write(tmp_path / "other", nodes=7, days=3, seed=2)
    cfg = tiny_config(tmp_path / "other", tmp_path / "x", init_from=str(result.run_dir))
    with pytest.raises(GWNetError, match="different sensor graph"):
        Trainer(cfg)


def test_early_stopping(finished_run, tmp_path, monkeypatch):
    root, _, _ = finished_run
    maes = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])
    original = Trainer.evaluate

    def scripted(self, split="val"):
        acc = original(self, split)
        if split == "val":
            acc.sums[0] = next(maes) * acc.sums[3]  # |e| sums giving the scripted MAE
        return acc

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    cfg = tiny_config(root / "data", tmp_path / "es", epochs=10, patience=2, batches_per_epoch=1)
    result = train(cfg)
    assert result.best_epoch == 2 and len(result.history) == 4


def test_adaptive_only_with_svd_initialisation(finished_run, tmp_path):
    root, _, _ = finished_run
    cfg = tiny_config(root / "data", tmp_path / "apt", epochs=1, batches_per_epoch=2)
    cfg.model.aptonly, cfg.model.randomadj = True, False
    trainer = Trainer(cfg)
    assert trainer.model.num_fixed == 0 and trainer.model.adaptive is not None
    trainer.fit()
    model, *_ = load_trained(tmp_path / "apt")
    assert model.num_fixed == 0


def test_killed_between_last_epoch_and_test_metrics_resumes_to_finish(finished_run, tmp_path):
    import shutil

    root, cfg, result = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(result.run_dir, copy)
    (copy / "test_metrics.csv").unlink()
    cfg2 = Config.from_dict(json.loads((copy / "config.json").read_text()))
    cfg2.out = str(copy)
    resumed = train(cfg2, resume=True)
    pd.testing.assert_frame_equal(resumed.test_metrics, result.test_metrics)
    assert len(resumed.history) == len(result.history)


def test_nan_loss_stops_with_clear_message(finished_run, tmp_path):
    root, _, _ = finished_run
    cfg = tiny_config(root / "data", tmp_path / "nan", epochs=1)
    with pytest.raises(GWNetError, match="non-finite loss at epoch 1, batch 1"):
        Trainer(cfg, loss_fn=lambda p, t, n: masked_mae(p, t, n) * float("nan")).fit()
    cfg = tiny_config(root / "data", tmp_path / "nan-skip", epochs=1, nan_policy="skip")
    with pytest.warns(UserWarning, match="batch skipped"):
        Trainer(cfg, loss_fn=lambda p, t, n: masked_mae(p, t, n) * float("nan")).fit()


def test_learns_better_than_last_value(tmp_path):
    from gwnet.data import synthetic

    synthetic.write(tmp_path / "data", nodes=8, days=4, seed=3)
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", epochs=4, lr=3e-3, batch_size=64)
    cfg.model.residual_channels = cfg.model.dilation_channels = 16
    cfg.model.skip_channels = cfg.model.end_channels = 32
    result = train(cfg)
    data = load_data(cfg.data)
    baseline = evaluate_baseline(data, "last_value", "val").overall()["mae"]
    assert result.best_val_mae < baseline, (result.best_val_mae, baseline)


def test_cli_end_to_end(finished_run, tmp_path):
    root, _, _ = finished_run
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "gwnet", "train", "--dataset", str(root / "data"),
                          "--out", str(out), "--epochs", "1", "--residual-channels", "4",
                          "--dilation-channels", "4", "--skip-channels", "8", "--end-channels", "8",
                          "--blocks", "1", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "test metrics" in res.stdout and "mean" in res.stdout
    assert json.loads((out / "config.json").read_text())["model"]["residual_channels"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--resume", "{run}"], "already finished"),
    (["--resume", "{tmp}/nope"], "no such run directory"),
    (["--resume", "{tmp}"], "not a gwnet run directory"),
    (["--dataset", "{data}", "--out", "{tmp}/h", "--horizon", "5000"], "too few"),
    (["--dataset", "{tmp}/missing"], "not a dataset name"),
    (["--data", "{tmp}/x.h5", "--adj", "{tmp}/a.pkl", "--out", "{tmp}/o"], "no such data file"),
])
def test_cli_bad_input_is_one_line(finished_run, tmp_path, capsys, argv, message):
    from gwnet.cli.train import main

    root, _, result = finished_run
    argv = [a.format(run=result.run_dir, tmp=tmp_path, data=root / "data") for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("gwnet-train: error:")


def test_cli_rejects_unknown_choice(capsys):
    from gwnet.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--precision", "fp8"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_config_file_and_flag_precedence(tmp_path):
    from gwnet.cli.train import build_parser, resolve_config

    (tmp_path / "c.toml").write_text('[model]\nresidual_channels = 7\n[train]\nlr = 0.5\n')
    argv = ["--config", str(tmp_path / "c.toml"), "--lr", "0.25", "--model", "original"]
    cfg, resume = resolve_config(build_parser().parse_args(argv))
    assert cfg.preset == "original" and cfg.model.residual_channels == 7 and cfg.train.lr == 0.25
    assert cfg.train.clip == 5.0 and not resume  # the original recipe
    (tmp_path / "bad.yaml").write_text("model:\n  nope: 1\n")
    argv = ["--config", str(tmp_path / "bad.yaml")]
    with pytest.raises(GWNetError, match="unknown option model.nope"):
        resolve_config(build_parser().parse_args(argv))
    (tmp_path / "typed.yaml").write_text("train:\n  lr: 1e-3\n  epochs: '5'\n")
    cfg, _ = resolve_config(build_parser().parse_args(["--config", str(tmp_path / "typed.yaml")]))
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 5
    (tmp_path / "wrong.yaml").write_text("train:\n  epochs: many\n")
    with pytest.raises(GWNetError, match="option epochs must be int, got 'many'"):
        resolve_config(build_parser().parse_args(["--config", str(tmp_path / "wrong.yaml")]))


def test_abbreviated_flags_are_refused(capsys):
    from gwnet.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--epoch", "50"])
    assert exc.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err
