"""Ensembles and gwnet-predict: strategies against their guarantees, outputs, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.optimize
import torch

from gwnet.cli.predict import main
from gwnet.config import Config
from gwnet.data import read_speeds, synthetic
from gwnet.engine import train
from gwnet.engine.checkpoint import RunDir, load_checkpoint, save_checkpoint
from gwnet.ensemble import COLUMNS, Ensemble, load_members, nnls_from_gram, run
from gwnet.errors import GWNetError

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_run(data: Path, out: Path, horizon: int, channels: int) -> Path:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(data)
    cfg.data.horizon = horizon
    m = cfg.model
    m.residual_channels = m.dilation_channels = channels
    m.skip_channels = m.end_channels = 8
    m.blocks = 1
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.progress, t.device, t.seed = 2, 4, False, "cpu", horizon
    cfg.out = str(out)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """Two tiny runs on the same data: 6 horizons and 12 horizons."""
    root = tmp_path_factory.mktemp("predict")
    paths = synthetic.write(root / "data", nodes=6, days=3, seed=3)
    return SimpleNamespace(root=root, speeds=paths["speeds"], adj=paths["adj"],
                           h6=tiny_run(root / "data", root / "h6", 6, 4),
                           h12=tiny_run(root / "data", root / "h12", 12, 8))


@pytest.fixture(scope="module")
def loaded(runs):
    return load_members([runs.h6, runs.h12])


def by_horizon(metrics: pd.DataFrame, value: str) -> pd.DataFrame:
    return metrics.pivot(index="horizon", columns="model", values=value)


def predict(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv] + ["--device", "cpu"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- strategies -----------------------------------------------------------------------------
def test_per_horizon_is_the_best_member_on_validation_at_every_horizon(loaded, tmp_path):
    members, data = loaded
    ensemble = Ensemble(members, "per-horizon")
    report = run(ensemble, data, tmp_path, split="val", plots=False)
    mae = by_horizon(report.metrics, "mae")
    best = mae[["h6", "h12"]].min(axis=1)
    assert len(mae) == 12 and mae["h6"].iloc[6:].isna().all()
    assert (mae["ensemble"] <= best + 1e-9).all()
    # The 6-horizon member competes at horizons 1..6 only.
    assert (ensemble.weights[6:, 0] == 0).all() and (ensemble.weights[6:, 1] == 1).all()
    chosen = ensemble.weights.argmax(axis=1)
    np.testing.assert_array_equal(chosen, mae[["h6", "h12"]].fillna(np.inf).to_numpy().argmin(axis=1))


def test_weighted_is_no_worse_than_the_best_member_on_validation(loaded, tmp_path):
    members, data = loaded
    ensemble = Ensemble(members, "weighted")
    report = run(ensemble, data, tmp_path, split="val", plots=False)
    # NNLS minimises the squared error; each member alone is a feasible point.
    rmse = by_horizon(report.metrics, "rmse")
    best = rmse[["h6", "h12"]].min(axis=1)
    assert (rmse["ensemble"] <= best * (1 + 1e-6)).all()
    assert (ensemble.weights >= 0).all() and (ensemble.weights[6:, 0] == 0).all()
    saved = json.loads((tmp_path / "ensemble.json").read_text())
    assert saved["strategy"] == "weighted"
    assert saved["horizons"][0]["weights"] == pytest.approx(dict(zip(["h6", "h12"], ensemble.weights[0])))
    assert set(saved["horizons"][11]["weights"]) == {"h12"}


def test_nnls_from_gram_equals_nnls_on_the_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) + 5
    x = np.column_stack([x, x[:, 0]])  # a duplicate column: a singular Gram matrix
    y = x[:, :3] @ [0.5, 0.0, 0.7] + rng.normal(size=200)
    w = nnls_from_gram(x.T @ x, x.T @ y)
    expected = scipy.optimize.nnls(x, y)[0]
    assert (w >= 0).all()
    assert np.sum((x @ w - y) ** 2) == pytest.approx(np.sum((x @ expected - y) ** 2), rel=1e-9)


# --- outputs --------------------------------------------------------------------------------
def test_csv_table_schema_rows_missing_actuals_and_plots(runs, tmp_path, capsys):
    speeds = read_speeds(runs.speeds)
    n = len(speeds)
    # Missing readings in the test period (the last 20%): an outage and scattered dropouts.
    speeds.iloc[n - 60:n - 30, 0] = 0.0
    speeds.iloc[np.arange(n - 150, n, 7), 2] = 0.0
    csv = tmp_path / "speeds.csv"
    speeds.to_csv(csv)
    out = tmp_path / "out"
    rc, stdout, _ = predict([runs.h6, runs.h12, "--data", csv, "--adj", runs.adj, "--out", out,
                             "--strategy", "mean"], capsys)
    assert rc == 0 and "ensemble" in stdout
    table = pd.read_csv(out / "predictions.csv", parse_dates=["origin_time", "target_time"],
                        dtype={"sensor_id": str})
    _, data = load_members([runs.h6, runs.h12], data=str(csv), adj=str(runs.adj))
    test = data.windows["test"]
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == len(test) * 6 * 12
    assert sorted(table["horizon"].unique()) == list(range(1, 13))
    assert ((table["target_time"] - table["origin_time"]) == table["horizon"] * pd.Timedelta("5min")).all()
    assert table["sensor_id"].iloc[:6].tolist() == data.sensor_ids
    _, y = test.batch(torch.arange(len(test)))
    assert int((y == 0).sum()) > 0
    assert table["actual"].isna().sum() == int((y == 0).sum())
    assert not (table["actual"] == 0).any()
    np.testing.assert_allclose(table["actual"].fillna(0).to_numpy(), y.numpy().ravel(), rtol=1e-6)
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["model"]) == {"h6", "h12", "ensemble"}
    assert set(pd.read_csv(out / "ensemble.csv")["member"]) == {"h6", "h12"}
    for name in ("mae_by_horizon.png", "sensors.png", "adaptive_adjacency.png"):
        head = (out / name).read_bytes()[:8]
        assert head == PNG, name


def test_cli_end_to_end_parquet_in_a_subprocess(runs, loaded, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "gwnet", "predict", str(runs.h6), str(runs.h12),
                           "--out", str(out), "--format", "parquet", "--strategy", "mean",
                           "--split", "val", "--no-plots", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_parquet(out / "predictions.parquet")
    _, data = loaded
    assert list(table.columns) == list(COLUMNS)
    assert str(table["origin_time"].dtype) == "datetime64[ns]" and table["horizon"].dtype == np.int32
    assert len(table) == len(data.windows["val"]) * 6 * 12
    assert (table["origin_time"].unique() == data.windows["val"].origins).all()
    assert not (table["actual"] == 0).any()
    assert not list(out.glob("*.png")) and (out / "metrics.csv").exists()


def test_latest_forecasts_the_next_hour_after_the_last_reading(runs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, _ = predict([runs.h6, runs.h12, "--latest", "--strategy", "mean", "--out", out], capsys)
    assert rc == 0
    table = pd.read_csv(out / "predictions.csv", parse_dates=["origin_time", "target_time"])
    last = read_speeds(runs.speeds).index[-1]
    assert len(table) == 6 * 12
    assert (table["origin_time"] == last).all()
    steps = (table["target_time"] - last) / pd.Timedelta("5min")
    assert (steps == table["horizon"]).all() and sorted(steps.unique()) == list(range(1, 13))
    assert table["actual"].isna().all()
    assert not (out / "metrics.csv").exists()
    assert (out / "sensors.png").read_bytes()[:8] == PNG


def test_reference_checkpoint_member_predicts_as_the_run_it_came_from(runs, loaded, tmp_path):
    state = load_checkpoint(RunDir(runs.h12).best)["model"]
    path = tmp_path / "reference.pth"
    torch.save(to_reference_layout(state), path)
    members, data = load_members([runs.h6, path])
    assert [m.horizon for m in members] == [6, 12] and data.config.horizon == 12
    ours, _ = loaded
    x, _ = data.windows["val"].batch(torch.arange(8), scaler=members[1].scaler)
    torch.testing.assert_close(members[1].forward(x), ours[1].forward(x))


def to_reference_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This package's state_dict in the improved reference implementation's names and shapes."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        conv = value[:, :, None, None] if value.dim() == 2 else value  # Linear -> 1x1 Conv2d
        if parts[0] == "adaptive":
            out[parts[1]] = value
        elif parts[0] != "layers":
            out[key] = conv
        elif parts[2] == "temporal":
            half = value.shape[0] // 2
            for name, part in (("filter", value[:half]), ("gate", value[half:])):
                out[f"{name}_convs.{parts[1]}.{parts[3]}"] = part[:, :, None] if part.dim() == 3 else part
        elif parts[2] == "norm":
            out[f"bn.{parts[1]}.{parts[3]}"] = value
        else:
            name = {"skip": "skip_convs", "graph_conv": "graph_convs"}[parts[2]]
            suffix = ".final_conv" if parts[2] == "graph_conv" else ""
            out[f"{name}.{parts[1]}{suffix}.{parts[3]}"] = conv
    return out


# --- bad input ------------------------------------------------------------------------------
def edited_copy(run: Path, dest: Path, edit) -> Path:
    shutil.copytree(run, dest)
    payload = load_checkpoint(RunDir(dest).best)
    edit(payload)
    save_checkpoint(RunDir(dest).best, payload)
    return dest


def other_sensors(payload: dict) -> None:
    payload["sensor_ids"] = [f"x{s}" for s in payload["sensor_ids"]]


def shorter_inputs(payload: dict) -> None:
    payload["config"]["data"]["seq_len"] = 6


@pytest.mark.parametrize("case", ["missing run", "other sensors", "other features", "empty split",
                                  "unknown sensor"])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, case):
    args, named = [runs.h6, runs.h12, "--out", tmp_path / "out"], None
    if case == "missing run":
        named = tmp_path / "no-such-run"
        args[1] = named
    elif case == "other sensors":
        named = args[1] = edited_copy(runs.h12, tmp_path / "h12-other", other_sensors)
    elif case == "other features":
        named = args[1] = edited_copy(runs.h12, tmp_path / "h12-short", shorter_inputs)
    elif case == "empty split":
        named = tmp_path / "short.csv"
        read_speeds(runs.speeds).iloc[:27].to_csv(named)  # 4 windows: none left for validation
        args += ["--data", named, "--adj", runs.adj]
    else:
        named = runs.speeds
        args += ["--sensors", "no-such-sensor"]
    rc, _, err = predict(args, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gwnet-predict: error: "), err
    assert str(named) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_a_member_given_twice_is_refused(runs):
    with pytest.raises(GWNetError, match="is given twice"):
        load_members([runs.h6, str(runs.h6) + "/"])


def test_evaluate_on_other_data_keeps_the_runs_windows(runs):
    from gwnet import evaluate
    from gwnet.config import DataConfig

    table = evaluate(runs.h6, DataConfig(data=str(runs.speeds), adj=str(runs.adj), horizon=12), device="cpu")
    assert list(table.index) == [str(h) for h in range(1, 7)] + ["mean"]


# --- the output directory: never a mix of two results, never a directory we did not write -----
def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_an_earlier_result_is_replaced_only_with_overwrite_and_whole(runs, tmp_path, capsys):
    out = tmp_path / "out"
    members = [runs.h6, runs.h12, "--no-plots", "--out", out]
    assert predict([*members, "--split", "val"], capsys)[0] == 0
    before = files_of(out)
    rc, _, err = predict([*members, "--latest"], capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert f"gwnet-predict: error: {out}: already holds results; pass --overwrite" in err
    assert files_of(out) == before
    assert predict([*members, "--latest", "--overwrite"], capsys)[0] == 0
    # The latest window has no actuals: the earlier metrics.csv went with the earlier result.
    assert sorted(files_of(out)) == ["ensemble.csv", "ensemble.json", "predictions.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it


@pytest.mark.parametrize("case", ["a file", "under a file", "a run directory"])
def test_an_out_that_cannot_take_the_result_is_refused_before_any_work(runs, tmp_path, capsys, monkeypatch,
                                                                        case):
    def no_work(*args, **kwargs):
        raise AssertionError("loaded the members first")

    monkeypatch.setattr("gwnet.cli.predict.load_members", no_work)
    (tmp_path / "file").write_text("not a directory")
    out, message = {"a file": (tmp_path / "file", "exists and is not a directory"),
                    "under a file": (tmp_path / "file" / "out", "cannot write here"),
                    "a run directory": (tmp_path / "run", "which gwnet-predict did not write")}[case]
    if case == "a run directory":
        shutil.copytree(runs.h6, out)
    before = files_of(tmp_path / "run") if case == "a run directory" else None
    rc, _, err = predict([runs.h6, "--out", out, "--overwrite"], capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert err.startswith(f"gwnet-predict: error: {out}: ") and message in err
    if before is not None:
        assert files_of(out) == before


def test_a_prediction_killed_while_overwriting_leaves_the_earlier_result(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict([runs.h6, "--split", "val", "--no-plots", "--out", out], capsys)[0] == 0
    before = files_of(out)
    # SIGKILL once predictions.csv and metrics.csv of the new result are written.
    code = ("import os, signal, sys; import gwnet.ensemble.report as report; "
            "report.atomic_write_text = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
            "from gwnet.cli.predict import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, str(runs.h6), "--split", "test", "--no-plots",
                           "--out", str(out), "--overwrite", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert files_of(out) == before
    assert predict([runs.h6, "--split", "test", "--no-plots", "--out", out, "--overwrite"], capsys)[0] == 0
    assert files_of(out)["predictions.csv"] != before["predictions.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed one's leftovers are gone


def test_malloc_policy_reaches_the_allocator(runs, tmp_path, capsys, monkeypatch):
    """--malloc as gwnet-train's: reuse keeps freed memory; auto only above the mapping
    ceiling (lowered here so that the tiny run's activation is above it); system never."""
    from gwnet.engine import allocator

    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    expected = {"reuse": 1, "auto": 0, "system": 0}
    for policy, want in expected.items():
        calls.clear()
        rc, _, _ = predict([runs.h6, "--no-plots", "--malloc", policy, "--out", tmp_path / policy], capsys)
        assert rc == 0 and len(calls) == want, policy
    monkeypatch.setattr(allocator, "MMAP_CEILING", 0)
    calls.clear()
    assert predict([runs.h6, "--no-plots", "--out", tmp_path / "auto-small-ceiling"], capsys)[0] == 0
    assert calls == [1]
