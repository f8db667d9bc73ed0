"""Calibrated intervals and quantile training: metrics against hand-worked values, conformal
coverage, the online update, gwnet-predict --interval, quantile runs, bad input."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from gwnet.cli.predict import main as predict_main
from gwnet.cli.train import main as train_main
from gwnet.config import Config
from gwnet.data import synthetic
from gwnet.engine import train
from gwnet.engine.checkpoint import RunDir, load_checkpoint
from gwnet.engine.quantiles import masked_pinball
from gwnet.errors import GWNetError
from gwnet.intervals import (INTERVALS, IntervalAccumulator, OnlineConformal, crps_from_quantiles, start_online,
                             stream, winkler)

LEVELS = (0.1, 0.5, 0.9)


# --- metrics against hand-worked values ---------------------------------------------------
def test_pinball_and_crps_hand_worked():
    # Quantiles 1, 2, 3 at levels 0.1, 0.5, 0.9 and a reading of 2.5: errors 1.5, 0.5, -0.5;
    # losses 0.1 * 1.5 = 0.15, 0.5 * 0.5 = 0.25, (0.9 - 1) * -0.5 = 0.05; mean 0.15; CRPS 0.3.
    q = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    y = torch.tensor([2.5]).view(1, 1, 1)
    assert masked_pinball(q, y, LEVELS).item() == pytest.approx(0.15)
    assert crps_from_quantiles(q, y, LEVELS).item() == pytest.approx(0.3)
    # A point forecast (every quantile 2) with levels symmetric about 0.5: CRPS is |y - 2|.
    flat = torch.full((1, 1, 3, 1), 2.0)
    assert crps_from_quantiles(flat, y, LEVELS).item() == pytest.approx(0.5)
    # Winkler at alpha 0.1: width 2 plus 2/0.1 times the miss of 1.
    assert winkler(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(4.0), 0.1).item() == pytest.approx(22.0)
    assert winkler(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(2.0), 0.1).item() == pytest.approx(2.0)


def test_quantile_training_loss_of_the_median_alone_is_masked_mae():
    from gwnet.engine.metrics import masked_mae
    from gwnet.engine.quantiles import pinball_loss_fn

    pred = torch.tensor([[[1.0, 2.0, 5.0]]])
    y = torch.tensor([[[2.5, 0.0, 4.0]]])  # one missing reading
    loss = pinball_loss_fn([0.5])(pred.unsqueeze(2), y, 0.0)
    assert loss.item() == pytest.approx(masked_mae(pred, y).item()) == pytest.approx(1.25)


def test_masked_readings_count_in_no_metric():
    q = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]).T.reshape(1, 1, 3, 2)
    y = torch.tensor([2.5, 0.0]).view(1, 1, 2)  # the second reading is missing (0)
    assert masked_pinball(q, y, LEVELS).item() == pytest.approx(0.15)
    acc = IntervalAccumulator(1, 0.8)
    pred, lower, upper = q[:, :, 1], q[:, :, 0], q[:, :, 2]
    acc.update(pred, lower, upper, y, q, LEVELS)
    row = acc.per_horizon().iloc[0]
    assert row["coverage"] == 1.0 and row["width"] == pytest.approx(2.0)
    assert row["crps"] == pytest.approx(0.3) and row["interval_score"] == pytest.approx(2.0)
    # (0.1 * 1.5 + 0.5 * 0.5 + 0.1 * 0.5) / 3 for the interval's own three quantiles.
    assert row["pinball"] == pytest.approx(0.15)


# --- conformal coverage on exchangeable residuals ----------------------------------------------
def fake_batches(n: int, horizon: int, nodes: int, seed: int, noise: float = 1.0, grow: float = 0.0):
    """Batches of a forecaster whose errors are Gaussian, larger at rush hours (7-9 h) and
    ``grow`` times larger per 1000 windows (drift); windows 5 minutes apart."""
    rng = np.random.default_rng(seed)
    origins = pd.date_range("2020-01-06", periods=n, freq="5min")
    lead = np.arange(1, horizon + 1) * np.timedelta64(5, "m")
    out = []
    for start in range(0, n, 256):
        stamps = origins[start:start + 256]
        times = stamps.to_numpy()[:, None] + lead[None, :]
        hours = pd.DatetimeIndex(times.ravel()).hour.to_numpy().reshape(times.shape)
        scale = noise * np.where((hours >= 7) & (hours < 10), 3.0, 1.0)[..., None]
        scale = scale * (1 + grow * (np.arange(start, start + len(stamps)) / 1000.0))[:, None, None]
        scale = scale * np.linspace(0.5, 1.5, nodes)[None, None, :] * np.sqrt(np.arange(1, horizon + 1))[None, :, None]
        pred = np.full((len(stamps), horizon, nodes), 50.0)
        actual = pred + rng.normal(size=pred.shape) * scale
        out.append(SimpleNamespace(origins=stamps, target_times=times, prediction=torch.tensor(pred).float(),
                                   actual=torch.tensor(actual).float(), quantiles=None, levels=None))
    return out


def coverage(method, batches) -> np.ndarray:
    acc = IntervalAccumulator(method.horizon, method.level)
    for b in batches:
        lower, upper = method.bounds(b)
        assert bool((lower <= b.prediction).all() and (b.prediction <= upper).all())
        acc.update(b.prediction, lower, upper, b.actual)
    return acc.per_horizon()["coverage"].to_numpy(), acc.overall()


@pytest.mark.parametrize("name", ["split", "normalized"])
def test_conformal_covers_at_the_level_on_exchangeable_residuals(name):
    H, N = 3, 4
    method = INTERVALS[name](0.9, H)
    # The difficulty comes from other windows (a "training" stretch), calibration from its own.
    method.fit_difficulty(fake_batches(2016, H, N, seed=1))
    method.fit(fake_batches(2016, H, N, seed=2))
    per_horizon, overall = coverage(method, fake_batches(8064, H, N, seed=3))
    # 8064 x 4 readings per horizon: sampling sd of a 90% coverage ~0.0017 (plus the
    # finite-calibration excess below 1/(n+1) and the windows' dependence on hours).
    assert np.all(np.abs(per_horizon - 0.9) < 0.015), per_horizon


def test_normalized_is_narrower_than_split_where_errors_vary_by_hour():
    H, N = 2, 4
    scores = {}
    for name in ("split", "normalized"):
        method = INTERVALS[name](0.9, H)
        method.fit_difficulty(fake_batches(2016, H, N, seed=1))
        method.fit(fake_batches(2016, H, N, seed=2))
        scores[name] = coverage(method, fake_batches(4032, H, N, seed=3))[1]
    assert scores["normalized"]["interval_score"] < 0.9 * scores["split"]["interval_score"]
    assert abs(scores["normalized"]["coverage"] - 0.9) < 0.015


def test_calibrating_on_the_wrong_split_is_seen_to_fail():
    """Residuals of the training split are smaller than those of new data (the model saw them):
    calibrated there, the intervals cover far less than asked."""
    method = INTERVALS["split"](0.9, 2)
    method.fit(fake_batches(2016, 2, 4, seed=2, noise=0.6))
    per_horizon, _ = coverage(method, fake_batches(4032, 2, 4, seed=3))
    assert np.all(per_horizon < 0.8)


def test_cqr_keeps_lower_below_prediction_below_upper():
    method = INTERVALS["cqr"](0.9, 1)
    pred = torch.tensor([[[50.0, 50.0]]])
    # Quantiles far too wide: the conformal correction is negative and would cross the median.
    q = torch.stack([pred - 10, pred, pred + 10], dim=2)
    rng = np.random.default_rng(0)
    actual = pred + torch.tensor(rng.normal(size=(400, 1, 2)) * 0.1).float()
    batch = SimpleNamespace(prediction=pred.expand(400, 1, 2), quantiles=q.expand(400, 1, 3, 2), levels=LEVELS,
                            actual=actual, target_times=np.zeros((400, 1), dtype="datetime64[m]"))
    method.fit([batch])
    assert method.q[0] < 0
    lower, upper = method.bounds(batch)
    assert bool((lower <= batch.prediction).all() and (batch.prediction <= upper).all())


# --- the online update --------------------------------------------------------------------
def test_online_update_keeps_coverage_when_errors_grow():
    H, N = 2, 4
    method = INTERVALS["split"](0.9, H)
    method.fit(fake_batches(1000, H, N, seed=2))
    results = {}
    for online in (None, start_online(method, step=0.1)):
        acc = IntervalAccumulator(H, 0.9)
        for b in stream(method, fake_batches(4000, H, N, seed=5, grow=0.5), online):
            acc.update(b.prediction, b.lower, b.upper, b.actual)
        results["online" if online else "fixed"] = acc.overall()["coverage"]
    assert results["fixed"] < 0.8  # the errors tripled: fixed widths fall far below 90%
    assert 0.87 <= results["online"] <= 0.93, results


def test_online_state_round_trip_continues_exactly():
    rng = np.random.default_rng(0)
    steps = [(np.zeros((2, 3)), rng.normal(size=(2, 3)) * (1 + i / 10)) for i in range(40)]

    def run(online, part):
        for f, y in part:
            lo, hi = online.interval(f)
            online.update(f, lo, hi, y)
        return online

    whole = run(OnlineConformal(0.9, [1.0, 1.0]), steps)
    half = run(OnlineConformal(0.9, [1.0, 1.0]), steps[:20])
    state = json.loads(json.dumps(half.to_dict()))
    resumed = run(OnlineConformal.from_dict(state), steps[20:])
    np.testing.assert_allclose(resumed.widths(3), whole.widths(3), atol=1e-5)
    assert not np.allclose(whole.widths(3), 1.0)  # the errors grew: so did the widths
    assert resumed.coverage() == pytest.approx(whole.coverage())
    with pytest.raises(GWNetError, match="not a saved online interval state"):
        OnlineConformal.from_dict({"level": 0.9})


# --- runs, gwnet-predict --interval ------------------------------------------------------------
def tiny(data: Path, out: Path, quantiles=None, epochs: int = 2, model: str = "improved") -> Config:
    cfg = Config.from_preset(model)
    cfg.data.dataset = str(data)
    cfg.data.horizon = 3
    m = cfg.model
    if model == "improved":
        m.residual_channels = m.dilation_channels = 4
        m.skip_channels = m.end_channels = 8
        m.blocks = 1
    else:
        m.hidden_channels = 8
    m.quantiles = quantiles
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.progress, t.device, t.seed = epochs, 3, False, "cpu", 1
    cfg.out = str(out)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("intervals")
    paths = synthetic.write(root / "data", nodes=5, days=3, seed=4)
    point = train(tiny(root / "data", root / "point")).run_dir
    quant = train(tiny(root / "data", root / "quant", [0.05, 0.5, 0.95])).run_dir
    mlp = train(tiny(root / "data", root / "mlpq", [0.1, 0.5, 0.9], model="mlp")).run_dir
    return SimpleNamespace(root=root, data=root / "data", speeds=paths["speeds"], adj=paths["adj"],
                           point=point, quant=quant, mlp=mlp)


def predict(argv, capsys):
    rc = predict_main([str(a) for a in argv] + ["--device", "cpu", "--no-plots"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_quantile_runs_forecast_quantiles_and_report_the_median(runs):
    state = load_checkpoint(RunDir(runs.quant).best)
    assert list(state["config"]["model"]["quantiles"]) == [0.05, 0.5, 0.95]
    # The output layer has horizons x quantiles rows.
    assert state["model"]["end_conv_2.weight"].shape[0] == 3 * 3
    assert load_checkpoint(RunDir(runs.mlp).best)["model"]["head.weight"].shape[0] == 9
    metrics = pd.read_csv(RunDir(runs.quant).test_metrics, index_col=0)
    assert metrics.shape[0] == 4 and metrics["mae"].notna().all()


def test_predict_interval_single_runs(runs, tmp_path, capsys):
    for run, method in ((runs.point, "normalized"), (runs.quant, "cqr")):
        out = tmp_path / Path(run).name
        rc, text, err = predict([run, "--out", out, "--interval", "0.9"], capsys)
        assert rc == 0, err
        table = pd.read_csv(out / "predictions.csv")
        assert list(table.columns[4:8]) == ["prediction", "lower", "upper", "actual"]
        assert (table["lower"] <= table["prediction"]).all() and (table["prediction"] <= table["upper"]).all()
        metrics = pd.read_csv(out / "metrics.csv")
        ours = metrics[metrics["model"] == Path(run).name]
        assert ours["coverage"].between(0, 1).all() and (ours["width"] > 0).all()
        # Coverage in the file is what the table shows.
        inside = table.dropna(subset=["actual"])
        hit = ((inside["lower"] <= inside["actual"]) & (inside["actual"] <= inside["upper"])).groupby(inside["horizon"]).mean()
        np.testing.assert_allclose(ours.set_index("horizon")["coverage"], hit, atol=1e-6)
        assert f"90% intervals" in text and "coverage %" in text
        assert ours["crps"].notna().all() == (method == "cqr")
        assert {"normalized": "normalised conformal", "cqr": "(CQR)"}[method] in text


def test_predict_interval_mixed_ensemble(runs, tmp_path, capsys):
    out = tmp_path / "mixed"
    rc, text, err = predict([runs.point, runs.quant, "--out", out, "--interval", "0.8", "--strategy", "mean"], capsys)
    assert rc == 0, err
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics.loc[metrics["model"] == "ensemble", "coverage"].notna().all()
    assert metrics.loc[metrics["model"] != "ensemble", "coverage"].isna().all()
    assert "normalised" in text  # a mixed ensemble forecasts points: no CQR
    # Two quantile runs (other models, other levels) make a quantile ensemble only with the same levels.
    rc, _, err = predict([runs.quant, runs.mlp, "--out", tmp_path / "qq", "--interval", "0.9",
                          "--interval-method", "cqr"], capsys)
    assert rc == 2 and "need quantile forecasts" in err and len(err.strip().splitlines()) == 1


def test_latest_interval_state_continues(runs, tmp_path, capsys):
    speeds = pd.read_hdf(runs.speeds)
    early, late = tmp_path / "early.h5", tmp_path / "late.h5"
    speeds.iloc[:-4].to_hdf(early, key="df")
    speeds.to_hdf(late, key="df")
    out = tmp_path / "latest"
    args = [runs.quant, "--out", out, "--latest", "--interval", "0.9", "--adj", runs.adj]
    rc, _, err = predict(args + ["--data", early], capsys)
    assert rc == 0, err
    first = json.loads((out / "intervals_state.json").read_text())
    assert len(first["pending"]) == 1 and not np.sum(first["online"]["seen"] or 0)
    rc, text, err = predict(args + ["--data", late, "--overwrite"], capsys)
    assert rc == 0, err
    second = json.loads((out / "intervals_state.json").read_text())
    # Four new steps: horizons 1..3 of the earlier forecast are now known (where not missing).
    known = int((speeds.iloc[-4:-1] != 0).to_numpy().sum())
    assert np.sum(second["online"]["seen"]) == known > 0
    assert f"{known} new readings scored" in text
    table = pd.read_csv(out / "predictions.csv")
    assert table["lower"].notna().all() and (table["lower"] <= table["upper"]).all()


def test_intervals_survive_resume(runs, tmp_path, capsys):
    from gwnet.engine import Trainer
    from gwnet.engine.trainer import Interrupted

    whole = train(tiny(runs.data, tmp_path / "whole", [0.05, 0.5, 0.95], epochs=2)).run_dir
    cfg = tiny(runs.data, tmp_path / "cut", [0.05, 0.5, 0.95], epochs=2)
    trainer = Trainer(cfg)
    loss, calls = trainer.loss_fn, {"n": 0}

    def interrupting(pred, target, null_value):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-epoch 2
            trainer._stop_signal = signal.SIGTERM
        return loss(pred, target, null_value)

    trainer.loss_fn = interrupting
    with pytest.raises(Interrupted):
        trainer.fit()
    resumed = train(cfg, resume=True).run_dir
    tables = []
    for run in (whole, resumed):
        rc, _, err = predict([run, "--out", tmp_path / f"p-{Path(run).name}", "--interval", "0.9"], capsys)
        assert rc == 0, err
        tables.append(pd.read_csv(tmp_path / f"p-{Path(run).name}" / "predictions.csv"))
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_init_from_keeps_whole_horizons_of_a_quantile_head(runs, tmp_path):
    from gwnet.data import load_data
    from gwnet.engine.trainer import build_model, init_from_run

    cfg = tiny(runs.data, tmp_path / "h6", [0.05, 0.5, 0.95])
    cfg.data.horizon = 6
    cfg.validate()
    data = load_data(cfg.data)
    cfg.resolve(data.num_nodes)
    model = build_model(cfg, data)
    init_from_run(model, cfg, data, runs.quant)
    theirs = load_checkpoint(RunDir(runs.quant).best)["model"]["end_conv_2.weight"]
    torch.testing.assert_close(model.state_dict()["end_conv_2.weight"][:9], theirs)


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["0", "1", "1.5", "-0.1"])
def test_interval_level_outside_0_1_is_one_line(runs, tmp_path, capsys, level):
    rc, _, err = predict([runs.point, "--out", tmp_path / "o", "--interval", level], capsys)
    assert rc == 2 and "interval level must lie in (0, 1)" in err and len(err.strip().splitlines()) == 1


def test_interval_without_validation_split_is_one_line(runs, tmp_path, capsys):
    last = tmp_path / "last.h5"
    pd.read_hdf(runs.speeds).iloc[-20:].to_hdf(last, key="df")
    rc, _, err = predict([runs.point, "--out", tmp_path / "o", "--latest", "--interval", "0.9", "--data", last],
                         capsys)
    assert rc == 2 and "validation split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("levels,message", [(["0.05", "0.95"], "must include 0.5"),
                                            (["0.5", "0.05"], "sorted"), (["0.5", "1.2"], "in (0, 1)")])
def test_bad_quantiles_are_one_line(runs, tmp_path, capsys, levels, message):
    rc = train_main(["--dataset", str(runs.data), "--out", str(tmp_path / "r"), "--quantiles", *levels,
                     "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message.replace("in (0, 1)", "lie in (0, 1)") in err
    assert len([line for line in err.strip().splitlines() if "error" in line]) == 1
    assert not (tmp_path / "r" / "last.pt").exists()


# --- experiments/intervals.py: what it may delete and reuse ---------------------------------
def _intervals_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "intervals.py"
    spec = importlib.util.spec_from_file_location("intervals_experiment", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_benchmark_overwrite_deletes_only_what_it_made(tmp_path, capsys, monkeypatch):
    script = _intervals_script()

    def stop(root):  # the first step after the --out checks: no training here
        raise RuntimeError("reached training")

    monkeypatch.setattr(script, "event_data", stop)
    foreign = tmp_path / "foreign"
    (foreign / "default").mkdir(parents=True)
    (foreign / "thesis.tex").write_text("keep me")
    assert script.main(["--out", str(foreign), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not made by this script" in err
    assert (foreign / "thesis.tex").read_text() == "keep me" and (foreign / "default").is_dir()
    own = tmp_path / "own"
    with pytest.raises(RuntimeError, match="reached training"):
        script.main(["--out", str(own)])  # a new folder: taken, and marked as the script's
    (own / "default" / "point-s0").mkdir(parents=True)
    (own / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="reached training"):
        script.main(["--out", str(own), "--overwrite"])
    assert not (own / "default").exists() and (own / "notes.txt").read_text() == "mine"


def test_benchmark_refuses_a_run_folder_made_with_other_options(tmp_path, monkeypatch):
    script = _intervals_script()
    trained = []

    def fake_train(cfg, resume=False):  # what a finished run leaves that the check reads: its config
        trained.append(cfg.train.epochs)
        RunDir(cfg.out).root.mkdir(parents=True, exist_ok=True)
        RunDir(cfg.out).config.write_text(json.dumps(cfg.to_dict()))

    monkeypatch.setattr(script, "train", fake_train)
    monkeypatch.setattr(script, "run_finished", lambda out: RunDir(out).config.exists())
    out = tmp_path / "default" / "point-s0"
    script.train_run(out, None, None, 0, SimpleNamespace(epochs=1, batches=2))
    script.train_run(out, None, None, 0, SimpleNamespace(epochs=1, batches=2))  # the same options: reused
    assert trained == [1]
    with pytest.raises(GWNetError, match="made with other options.*train.epochs"):
        script.train_run(out, None, None, 0, SimpleNamespace(epochs=3, batches=2))
