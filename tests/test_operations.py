"""Operating gwnet: --latest from just the last readings, budgets, help and flags, readable
results, what training says, and the seams between stages (pretrain -> finetune, validation ->
ensemble)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import gwnet
from gwnet.config import Config
from gwnet.data import TrafficData, read_speeds, synthetic
from gwnet.data.graph import SensorGraph
from gwnet.engine import RunDir, load_checkpoint, train
from gwnet.engine.listeners import EpochListener

from conftest import make_adj, make_speeds


def tiny_config(dataset, out, horizon: int = 12, **train_options) -> Config:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(dataset)
    cfg.data.horizon = horizon
    cfg.data.unit = "mph"  # a directory of one's own data names no unit
    m = cfg.model
    m.residual_channels = m.dilation_channels = 4
    m.skip_channels = m.end_channels = 8
    m.blocks = 1
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.progress, t.device, t.seed = 2, 3, False, "cpu", horizon
    for k, v in train_options.items():
        setattr(t, k, v)
    cfg.out = str(out)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """Two tiny runs on one small synthetic dataset (6 sensors, 3 days): 12 and 6 horizons."""
    root = tmp_path_factory.mktemp("operations")
    paths = synthetic.write(root / "data", nodes=6, days=3, seed=5)
    long = train(tiny_config(root / "data", root / "long")).run_dir
    short = train(tiny_config(root / "data", root / "short", horizon=6)).run_dir
    return SimpleNamespace(root=root, data=root / "data", speeds=paths["speeds"], adj=paths["adj"],
                           long=Path(long), short=Path(short))


def predict(argv: list, capsys) -> tuple[int, str, str]:
    from gwnet.cli.predict import main

    rc = main([str(a) for a in argv] + ["--device", "cpu"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def printed_tables(out: str) -> str:
    """What gwnet-predict printed before the list of files it wrote."""
    return out.rsplit("\n\n", 1)[0]


def one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# --- 1. --latest from a file of just the last readings ---------------------------------------
def test_latest_from_the_last_readings_alone_matches_the_full_file(runs, tmp_path, capsys):
    speeds = read_speeds(runs.speeds)
    live = tmp_path / "live.h5"
    # the receptive field's 13 readings, columns shuffled: no graph, no splits in this file
    speeds.iloc[-13:, ::-1].to_hdf(live, key="df")
    # The README's command: one run, --latest, --data, --out, no --adj and no --strategy.
    rc, out, err = predict([runs.long, "--latest", "--data", live, "--out", tmp_path / "now"], capsys)
    assert rc == 0, err
    alone = pd.read_csv(tmp_path / "now" / "predictions.csv", parse_dates=["origin_time", "target_time"],
                        dtype={"sensor_id": str})
    assert len(alone) == 6 * 12 and (alone["origin_time"] == speeds.index[-1]).all()
    assert alone["actual"].isna().all()
    assert "ensemble" not in printed_tables(out) and "model long" in out
    # The same forecast as from the whole readings file, with its graph and splits.
    rc, _, err = predict([runs.long, "--latest", "--out", tmp_path / "full"], capsys)
    assert rc == 0, err
    full = pd.read_csv(tmp_path / "full" / "predictions.csv", dtype={"sensor_id": str})
    assert list(alone["sensor_id"]) == list(full["sensor_id"])
    np.testing.assert_allclose(alone["prediction"], full["prediction"], rtol=1e-5)


def test_latest_two_members_from_the_last_readings(runs, tmp_path, capsys):
    live = tmp_path / "live.csv"
    read_speeds(runs.speeds).iloc[-12:].to_csv(live)  # exactly seq_len readings
    rc, _, err = predict([runs.short, runs.long, "--latest", "--data", live, "--strategy", "mean",
                          "--out", tmp_path / "mean"], capsys)
    assert rc == 0, err
    assert len(pd.read_csv(tmp_path / "mean" / "predictions.csv")) == 6 * 12
    # A strategy fitted on validation has nothing to fit on: one line saying what to do.
    rc, _, err = predict([runs.short, runs.long, "--latest", "--data", live, "--out", tmp_path / "ph"], capsys)
    assert rc == 2 and "--strategy mean" in one_error_line(err, "gwnet-predict")


@pytest.mark.parametrize("case", ["too few", "other sensors", "other step"])
def test_latest_readings_that_do_not_fit_the_run_are_one_line(runs, tmp_path, capsys, case):
    speeds = read_speeds(runs.speeds)
    live = tmp_path / "live.csv"
    if case == "too few":
        frame = speeds.iloc[-5:]
    elif case == "other sensors":
        frame = speeds.iloc[-13:].rename(columns={speeds.columns[0]: "nobody"})
    else:
        frame = speeds.iloc[-26::2]  # 10-minute readings
    frame.to_csv(live)
    rc, _, err = predict([runs.long, "--latest", "--data", live, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    line = one_error_line(err, "gwnet-predict")
    assert str(live) in line
    assert {"too few": "too few", "other sensors": "sensor", "other step": "10 minutes"}[case] in line


# --- 2. budgets compose ----------------------------------------------------------------------
@pytest.mark.parametrize("argv,epochs,batches", [
    ([], 8, 30),
    (["--batches-per-epoch", "5"], 8, 5),
    (["--epochs", "2"], 2, 30),
    (["--epochs", "2", "--batches-per-epoch", "5"], 2, 5),
    (["--dataset", "metr-la"], 100, None),
])
def test_quick_budget_halves_give_way_one_at_a_time(argv, epochs, batches):
    from gwnet.cli.train import QUICK_BUDGET, build_parser, resolve_config

    assert QUICK_BUDGET == {"epochs": 8, "batches_per_epoch": 30}
    cfg, _ = resolve_config(build_parser(argv).parse_args(argv))
    assert (cfg.train.epochs, cfg.train.batches_per_epoch) == (epochs, batches)


def test_quick_budget_half_set_in_a_config_file(tmp_path):
    from gwnet.cli.train import build_parser, resolve_config

    (tmp_path / "c.toml").write_text("[train]\nepochs = 3\n")
    argv = ["--config", str(tmp_path / "c.toml")]
    cfg, _ = resolve_config(build_parser(argv).parse_args(argv))
    assert (cfg.train.epochs, cfg.train.batches_per_epoch) == (3, 30)


# --- 3. help, --version, misspelled flags ----------------------------------------------------
def test_help_shows_defaults_in_plain_text():
    from gwnet.cli import data, predict as predict_cli, train as train_cli

    text = " ".join(train_cli.build_parser().format_help().split())
    assert "--epochs EPOCHS maximum epochs (default: 100)" in text
    assert "(default: 3.0; presets may differ)" in text  # --clip: 5 in the original preset
    assert "--batch-size BATCH_SIZE windows per batch (default: 64)" in text
    for parser in (train_cli.build_parser(), predict_cli.build_parser(), data.build_parser()):
        assert "``" not in parser.format_help() and ":func:" not in parser.format_help()
    text = " ".join(predict_cli.build_parser().format_help().split())
    assert "(default: per-horizon)" in text and "(default: csv)" in text and "(default: test)" in text


@pytest.mark.parametrize("command", ["train", "predict", "data", "module"])
def test_version_on_every_command(command, capsys):
    import importlib

    from gwnet.__main__ import main as module_main

    if command == "module":
        assert module_main(["--version"]) == 0
    else:
        with pytest.raises(SystemExit) as exc:
            importlib.import_module(f"gwnet.cli.{command}").main(["--version"])
        assert exc.value.code == 0
    assert gwnet.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("command,argv,hint", [
    ("train", ["--epoch", "3"], "did you mean --epochs?"),
    ("train", ["--batch-per-epoch", "3"], "did you mean --batches-per-epoch?"),
    ("predict", ["run", "--out", "x", "--strategi", "mean"], "did you mean --strategy?"),
    ("data", ["synth", "--out", "x", "--nodez", "3"], "did you mean --nodes?"),
])
def test_a_misspelled_flag_is_one_line_naming_the_closest(command, argv, hint, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"gwnet.cli.{command}").main(argv)
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err, f"gwnet-{command}")
    assert "unrecognized arguments" in line and hint in line


def test_a_misspelled_command_of_python_m_gwnet_names_the_closest(capsys):
    from gwnet.__main__ import main as module_main

    assert module_main(["trian"]) == 2
    assert "did you mean train?" in capsys.readouterr().err


# --- 4. results a researcher can read --------------------------------------------------------
def test_train_table_has_units_minutes_and_baselines(runs, tmp_path, capsys):
    from gwnet.cli.train import main

    rc = main(["--dataset", str(runs.data), "--out", str(tmp_path / "cli"), "--epochs", "1",
               "--batches-per-epoch", "2", "--residual-channels", "4", "--dilation-channels", "4",
               "--skip-channels", "8", "--end-channels", "8", "--blocks", "1", "--no-progress",
               "--device", "cpu", "--unit", "mph"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "MAE and RMSE in mph (speed), MAPE in %" in out
    assert "+5 min" in out and "+60 min" in out and "mean" in out
    assert "last value MAE" in out and "hist. average MAE" in out


def test_predict_table_has_minutes_baselines_and_no_ensemble_for_one_model(runs, tmp_path, capsys):
    rc, out, err = predict([runs.long, "--out", tmp_path / "one", "--no-plots"], capsys)
    assert rc == 0, err
    assert "ensemble" not in printed_tables(out) and "model long" in out
    assert "MAE in mph" in out and "+5 min" in out and "last value" in out and "hist. average" in out
    rc, out, err = predict([runs.short, runs.long, "--out", tmp_path / "two", "--no-plots"], capsys)
    assert rc == 0 and "ensemble" in printed_tables(out) and "+30 min" in out


def test_mae_plot_axis_carries_the_unit(runs, tmp_path, monkeypatch):
    from gwnet.ensemble import Ensemble, load_members, plots, run

    figures = []
    original = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or original(fig, path))
    members, data = load_members([runs.long])
    run(Ensemble(members, "mean"), data, tmp_path / "out")
    mae = [f for f in figures if f.axes[0].get_title() == "MAE by horizon"][0]
    assert mae.axes[0].get_ylabel() == "MAE (mph)"
    # one model: one line, not the same numbers twice as "ensemble"; the baselines beside it
    assert [line.get_label() for line in mae.axes[0].get_lines()] == ["long", "last value (baseline)",
                                                                      "hist. average (baseline)"]


# --- 5. what training says -------------------------------------------------------------------
def test_stage_headers_and_the_line_before_the_first_epoch(runs, tmp_path, capsys):
    cfg = tiny_config(runs.data, tmp_path / "ft", epochs=1, pretrain_horizon=4, progress=True)
    train(cfg)
    err = capsys.readouterr().err
    assert f"stage 1/2: pretraining horizons 1-4 into {tmp_path / 'ft' / 'pretrain-h4'}" in err
    assert f"stage 2/2: finetuning horizons 1-12 from {tmp_path / 'ft' / 'pretrain-h4'} into {tmp_path / 'ft'}" in err
    assert "windows, 3 batches of 64 per epoch" in err  # no progress bar off a terminal
    quiet = tiny_config(runs.data, tmp_path / "quiet", epochs=1, pretrain_horizon=4)
    train(quiet)
    err = capsys.readouterr().err  # train.progress off: no bar, the same lines
    assert "stage 1/2: pretraining horizons 1-4" in err and "windows, 3 batches of 64 per epoch" in err


def test_early_stop_and_resume_are_said(runs, tmp_path, capsys, monkeypatch):
    from gwnet.engine import Trainer

    maes = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])
    evaluate = Trainer.evaluate

    def scripted(self, split="val"):
        acc = evaluate(self, split)
        if split == "val":
            acc.sums[0] = next(maes) * acc.sums[3]
        return acc

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    train(tiny_config(runs.data, tmp_path / "es", epochs=10, patience=2, batches_per_epoch=1, progress=True))
    assert "early stop: 2 epochs without improvement (best epoch 2" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "evaluate", evaluate)

    class StopAfterFirst(EpochListener):
        def on_epoch_end(self, trainer, record, improved):
            raise KeyboardInterrupt

    cfg = tiny_config(runs.data, tmp_path / "resume", epochs=2, progress=True)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, listeners=[StopAfterFirst()])
    capsys.readouterr()
    train(cfg, resume=True)
    assert "resuming at epoch 2 of 2" in capsys.readouterr().err


# --- 6. the seams: pretrain -> finetune, validation -> ensemble ------------------------------
class FirstWeights(EpochListener):
    """The model's weights when each fit starts (after any initialisation from another run)."""

    def __init__(self):
        self.states = []

    def on_fit_start(self, trainer):
        self.states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def test_finetuning_starts_from_the_pretrained_weights_through_the_pipeline(runs, tmp_path):
    spy = FirstWeights()
    cfg = tiny_config(runs.data, tmp_path / "ft", epochs=1, pretrain_horizon=4)
    train(cfg, listeners=[spy])
    assert len(spy.states) == 2  # pretraining's fit, then finetuning's
    pretrained = load_checkpoint(RunDir(tmp_path / "ft" / "pretrain-h4").best)["model"]
    start = spy.states[1]
    head = [k for k in pretrained if k.startswith("end_conv_2")]
    assert head and all(start[k].shape[0] == 12 and pretrained[k].shape[0] == 4 for k in head)
    for k in head:  # the pretrained horizons' rows carried over, the rest fresh
        torch.testing.assert_close(start[k][:4], pretrained[k])
    for k in pretrained:
        if k not in head and pretrained[k].is_floating_point():
            torch.testing.assert_close(start[k], pretrained[k])


def test_the_ensemble_is_fitted_on_validation_when_predicting_test(runs, tmp_path, capsys, monkeypatch):
    from gwnet.ensemble import Ensemble, load_members

    seen = []
    fit = Ensemble.fit

    def spy(self, windows, *a, **k):
        seen.append((windows.start, windows.stop))
        return fit(self, windows, *a, **k)

    monkeypatch.setattr(Ensemble, "fit", spy)
    rc, _, err = predict([runs.short, runs.long, "--split", "test", "--out", tmp_path / "out", "--no-plots"],
                         capsys)
    assert rc == 0, err
    _, data = load_members([runs.short, runs.long])
    val, test = data.windows["val"], data.windows["test"]
    assert seen == [(val.start, val.stop)] and (test.start, test.stop) != (val.start, val.stop)
    # and the weights written are those validation picks
    members, _ = load_members([runs.short, runs.long])
    expected = Ensemble(members, "per-horizon")
    fit(expected, val)
    written = pd.read_csv(tmp_path / "out" / "ensemble.csv")
    chosen = written.loc[written.groupby("horizon")["weight"].idxmax(), "member"].tolist()
    names = [m.name for m in members]
    assert chosen == [names[i] for i in expected.weights.argmax(axis=1)]


# --- 7. smaller ------------------------------------------------------------------------------
def test_original_preset_is_wu_et_al_recipe(tmp_path):
    cfg = Config.from_preset("original")
    t = cfg.train
    assert t.epochs == 100 and t.patience >= t.epochs  # no early stopping
    assert t.clip == 5.0 and t.lr_decay == 1.0 and not cfg.data.fill_zeroes
    assert t.clamp_max == math.inf  # forecasts not clamped to 70
    cfg.save(tmp_path / "c.json")
    again = Config.load(tmp_path / "c.json")
    assert again.train.clamp_max == math.inf and again.train.patience == t.patience


def test_original_run_is_not_clamped(tiny_dataset, tmp_path):
    cfg = Config.from_preset("original")
    cfg.data.dataset = str(tiny_dataset)
    m = cfg.model
    m.residual_channels = m.dilation_channels = 4
    m.skip_channels = m.end_channels = 8
    m.blocks = 1
    cfg.train.epochs, cfg.train.batches_per_epoch, cfg.train.progress, cfg.train.device = 1, 1, False, "cpu"
    cfg.out = str(tmp_path / "orig")
    train(cfg)
    saved = json.loads(RunDir(tmp_path / "orig").config.read_text(), parse_constant=float)
    assert saved["train"]["clamp_max"] == math.inf and "clamped" not in saved["data"]["protocol"]


def test_a_batch_with_every_target_missing_does_not_step(tmp_path):
    from gwnet.engine import Trainer

    speeds = make_speeds(steps=400, nodes=5)
    speeds.iloc[:200] = 0.0  # an outage over most of the training period
    cfg = tiny_config("synthetic", tmp_path / "empty", epochs=1, batches_per_epoch=None, batch_size=1)
    cfg.data.data, cfg.data.adj = "speeds.h5", "adj.pkl"  # names only: the frames are given
    data = TrafficData.from_frames(speeds, SensorGraph(list(speeds.columns), make_adj(5)), cfg.data)
    train_windows = data.windows["train"]
    _, y = train_windows.batch(torch.arange(len(train_windows)))
    empty = int((y == 0).flatten(1).all(1).sum())
    assert 0 < empty < len(train_windows)
    trainer = Trainer(cfg, data=data)
    steps = []
    trainer.optimizer.register_step_post_hook(lambda *a: steps.append(1))
    with pytest.warns(UserWarning, match=f"{empty} of {len(train_windows)} training batches had no valid"):
        result = trainer.fit()
    assert len(steps) == len(train_windows) - empty
    assert result.history["empty_batches"].tolist() == [empty]


def test_fill_zeroes_for_reference_members(runs, tmp_path, capsys):
    from gwnet.ensemble import load_members
    from test_predict import to_reference_layout

    path = tmp_path / "reference.pth"
    torch.save(to_reference_layout(load_checkpoint(RunDir(runs.long).best)["model"]), path)
    speeds = read_speeds(runs.speeds)
    speeds.iloc[-80:, 0] = 0.0  # an outage in the test period: missing inputs
    csv = tmp_path / "speeds.csv"
    speeds.to_csv(csv)
    members, _ = load_members([path], data=str(csv), adj=str(runs.adj), fill_zeroes=False)
    assert members[0].scaler.fill_zeroes is False and members[0].config.data.fill_zeroes is False
    members, _ = load_members([path], data=str(csv), adj=str(runs.adj))
    assert members[0].scaler.fill_zeroes is True
    tables = {}
    for flag in ("--fill-zeroes", "--no-fill-zeroes"):
        out = tmp_path / flag
        rc, _, err = predict([path, "--data", csv, "--adj", runs.adj, flag, "--out", out, "--no-plots",
                              "--strategy", "mean"], capsys)
        assert rc == 0, err
        tables[flag] = pd.read_csv(out / "predictions.csv")["prediction"].to_numpy()
    assert not np.allclose(tables["--fill-zeroes"], tables["--no-fill-zeroes"])


def test_gwnet_takes_the_scipy_supports_load_data_gives(tiny_dataset):
    import torch

    from gwnet import GWNet, GWNetConfig, load_data
    from gwnet.config import DataConfig
    from gwnet.data import to_torch

    data = load_data(DataConfig(dataset=str(tiny_dataset)))
    cfg = GWNetConfig.improved(num_nodes=data.num_nodes, residual_channels=8, dilation_channels=8,
                               skip_channels=8, end_channels=8, dropout=0.0)
    torch.manual_seed(0)
    from_scipy = GWNet(cfg, data.supports()).eval()
    torch.manual_seed(0)
    from_tensors = GWNet(cfg, to_torch(data.supports())).eval()
    x, _ = next(data.windows["test"].batches(4))
    torch.testing.assert_close(from_scipy(x), from_tensors(x))


def test_resume_refuses_options_that_change_what_the_run_computes(tiny_dataset, tmp_path, capsys):
    from gwnet.cli.train import main as train_main

    run = tmp_path / "run"
    base = ["--dataset", str(tiny_dataset), "--out", str(run), "--no-progress", "--epochs", "1",
            "--batches-per-epoch", "2", "--residual-channels", "8", "--dilation-channels", "8",
            "--skip-channels", "8", "--end-channels", "8"]
    assert train_main(base) == 0
    capsys.readouterr()
    for flag, value, name in (("--seq-len", "6", "data.seq_len"), ("--residual-channels", "16",
                                                                   "model.residual_channels"),
                              ("--lr", "0.01", "train.lr"), ("--data", str(tiny_dataset / "speeds.h5"), "data.data")):
        assert train_main(["--resume", str(run), flag, value]) == 2
        line = capsys.readouterr().err.strip()
        assert line.count("\n") == 0 and f"--resume cannot change {name}" in line, line
    # the epoch budget and runtime options may change (this run is finished: that is what stops it)
    assert train_main(["--resume", str(run), "--epochs", "2", "--device", "cpu", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert "run already finished" in line and "cannot change" not in line
