"""What a new user meets first: the graph an edge list becomes, what training prints with and
without the progress bar, units, MAPE, the plots, inspect of a PEMS file, --latest's minimum."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gwnet.cli import data as data_cli
from gwnet.cli import predict as predict_cli
from gwnet.cli import train as train_cli
from gwnet.data import synthetic
from gwnet.data.graph import read_graph
from gwnet.ensemble import plots
from gwnet.ensemble.members import ENSEMBLE

ROOT = Path(__file__).resolve().parents[1]
# Six edges among five sensors, 300 to 2,500 m: DCRNN's kernel keeps only the shortest.
EDGES = "from,to,distance\ns0,s1,300\ns1,s2,1200\ns2,s3,1500\ns3,s4,1800\ns0,s2,2100\ns1,s4,2500\n"
TINY = ["--residual-channels", "4", "--dilation-channels", "4", "--skip-channels", "8", "--end-channels", "8",
        "--blocks", "1", "--device", "cpu"]


@pytest.fixture
def own_files(tmp_path) -> tuple[Path, Path]:
    """A readings CSV of five sensors over two days and the six-edge list."""
    rng = np.random.default_rng(0)
    index = pd.date_range("2024-03-04", periods=576, freq="5min", name="time")
    values = 60 + 5 * rng.standard_normal((len(index), 5))
    pd.DataFrame(values, index=index, columns=[f"s{i}" for i in range(5)]).to_csv(tmp_path / "readings.csv")
    (tmp_path / "edges.csv").write_text(EDGES)
    return tmp_path / "readings.csv", tmp_path / "edges.csv"


def _train(argv, capsys) -> tuple[int, str, str]:
    rc = train_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- graphs from edge lists say what they kept ------------------------------------------------
def test_an_edge_list_cut_by_the_kernel_warns_and_reports_listed_against_kept(own_files):
    _, edges = own_files
    with pytest.warns(UserWarning, match=r"keeps only 1 of 6 listed edges: DCRNN's Gaussian kernel cut 5 .* "
                                         r"--adj-weights binary"):
        graph = read_graph(edges, sensor_ids=[f"s{i}" for i in range(5)])
    assert (graph.report.listed, graph.report.kept, graph.report.cut) == (6, 1, 5)
    assert graph.isolated == 3
    assert graph.describe() == (f"graph {edges}: 5 sensors, 1 of 6 listed edges kept (DCRNN's Gaussian kernel "
                                "of the distances, weights below --normalized-k 0.1 cut); 3 sensors in no edge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # binary keeps every listed edge: nothing to warn about
        binary = read_graph(edges, sensor_ids=[f"s{i}" for i in range(5)], weights="binary")
    assert (binary.report.listed, binary.report.kept, binary.isolated) == (6, 6, 0)


def test_training_prints_the_graph_line_and_the_warning(own_files, tmp_path, capsys):
    readings, edges = own_files
    with pytest.warns(UserWarning, match="keeps only 1 of 6 listed edges"):
        rc, out, err = _train(["--data", readings, "--adj", edges, "--epochs", "1", "--batches-per-epoch", "1",
                               "--out", tmp_path / "run", "--no-progress", *TINY], capsys)
    assert rc == 0
    assert re.search(r"graph .*edges\.csv: 5 sensors, 1 of 6 listed edges kept .*; 3 sensors in no edge", err)


def test_inspect_reports_listed_and_kept_edges(own_files, capsys):
    _, edges = own_files
    with pytest.warns(UserWarning):
        text = data_cli.inspect(str(edges))
    assert "5 (3 in no edge)" in text and "1 of 6 listed edges kept" in text


def test_conflicting_duplicates_and_unknown_ids_are_counted(tmp_path):
    path = tmp_path / "edges.csv"
    path.write_text("from,to,weight\na,b,1\na,b,2\nb,c,1\nc,zz,1\nyy,a,1\n")
    graph = read_graph(path, sensor_ids=["a", "b", "c"])
    assert (graph.report.listed, graph.report.kept, graph.report.conflicting, graph.report.unknown) == (2, 2, 1, 2)
    assert graph.adj[0, 1] == 2.0  # the last listed value
    assert "2 rows name sensors the data lacks" in graph.describe()


@pytest.mark.parametrize("value", ["inf", "1e39", "nan"])
def test_weights_float32_cannot_hold_are_refused(tmp_path, value):
    from gwnet.errors import GWNetError

    path = tmp_path / "edges.csv"
    path.write_text(f"from,to,weight\na,b,1\nb,c,{value}\n")
    if value == "nan":  # an empty-like value: no weight known, the row is skipped and counted
        with pytest.warns(UserWarning, match="1 of 3 sensors appear in no edge"):
            graph = read_graph(path, sensor_ids=["a", "b", "c"])
        assert graph.report.no_value == 1
        return
    with pytest.raises(GWNetError, match=rf"edges.csv: value '{value}' of edge 'b' -> 'c' is not a finite float32"):
        read_graph(path, sensor_ids=["a", "b", "c"])


# --- what training prints -------------------------------------------------------------------
def test_no_progress_still_prints_the_start_line_epochs_and_resume_position(own_files, tmp_path, capsys):
    import signal

    from gwnet import Config, Trainer
    from gwnet.engine.metrics import masked_mae
    from gwnet.engine.trainer import Interrupted

    readings, edges = own_files
    run = tmp_path / "run"
    rc, out, err = _train(["--data", readings, "--adj", edges, "--adj-weights", "binary", "--epochs", "2",
                           "--batches-per-epoch", "2", "--out", run, "--no-progress", *TINY], capsys)
    assert rc == 0
    assert "training " in err and " windows, 2 batches of 64 per epoch" in err
    assert len(re.findall(r"^epoch\s+\d/2 ", out, flags=re.M)) == 2
    # The same run stopped by a signal after batch 1 of epoch 2 says where it resumes.
    cfg = Config.load(run / "config.json")
    cfg.out = str(tmp_path / "again")
    trainer = Trainer(cfg)
    calls = {"n": 0}

    def interrupting(pred, target, null_value):
        calls["n"] += 1
        if calls["n"] == 3:
            trainer._stop_signal = signal.SIGTERM
        return masked_mae(pred, target, null_value)

    trainer.loss_fn = interrupting
    with pytest.raises(Interrupted):
        trainer.fit()
    capsys.readouterr()
    rc, out, err = _train(["--resume", tmp_path / "again", "--no-progress"], capsys)
    assert rc == 0 and "resuming at epoch 2 of 2, batch 2 (" in err
    assert len(re.findall(r"^epoch\s+2/2 ", out, flags=re.M)) == 1


def test_units_named_or_a_hint_to_name_them_and_mape_in_percent_everywhere(own_files, tmp_path, capsys):
    readings, edges = own_files
    rc, out, err = _train(["--data", readings, "--adj", edges, "--adj-weights", "binary", "--epochs", "1",
                           "--batches-per-epoch", "2", "--out", tmp_path / "run", *TINY], capsys)
    assert rc == 0 and "(name the unit with --unit)" in out
    console = float(re.search(r"^mean\s+\S+\s+\S+\s+(\S+)", out, flags=re.M).group(1))
    test = pd.read_csv(tmp_path / "run" / "test_metrics.csv", index_col=0)
    assert "mape" not in test.columns and console == pytest.approx(test.loc["mean", "mape_pct"], abs=1e-4)
    assert 1 < console < 50  # a percentage of 60 mph readings, not a fraction
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert {"train_mape_pct", "val_mape_pct"} <= set(history.columns)
    assert history["val_mape_pct"].iloc[0] > 1
    rc = predict_cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    out = capsys.readouterr().out
    metrics = pd.read_csv(tmp_path / "pred" / "metrics.csv")
    assert rc == 0 and "mape_pct" in metrics.columns and "mape" not in metrics.columns
    assert metrics.loc[metrics["horizon"] == 12, "mape_pct"].iloc[0] > 1


# --- plots ------------------------------------------------------------------------------------
@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions save, kept for their axes."""
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    return saved


def test_mae_plot_keeps_a_member_equal_to_the_ensemble_visible_and_draws_the_baselines(figures, tmp_path):
    rows = []
    for model, mae in (("short", 1.0), ("long", 1.5), (ENSEMBLE, 1.0)):  # short is the ensemble at every horizon
        rows += [{"model": model, "horizon": h, "mae": mae + 0.1 * h} for h in range(1, 4)]
    baselines = {"last value": pd.DataFrame({"mae": [2.0, 2.5, 3.0, 2.5]}, index=["1", "2", "3", "mean"])}
    plots.plot_mae_by_horizon(pd.DataFrame(rows), tmp_path / "m.png", np.array([5, 10, 15]), "mph", baselines)
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"short", "long", ENSEMBLE, "last value (baseline)"}
    short, ensemble = lines["short"], lines[ENSEMBLE]
    np.testing.assert_allclose(short.get_ydata(), ensemble.get_ydata())
    assert short.get_zorder() > ensemble.get_zorder() and short.get_linewidth() < ensemble.get_linewidth()
    assert (short.get_marker(), short.get_linestyle()) != (lines["long"].get_marker(), lines["long"].get_linestyle())
    np.testing.assert_allclose(lines["last value (baseline)"].get_ydata(), [2.0, 2.5, 3.0])
    assert ax.get_ylabel() == "MAE (mph)"


def test_sensor_plot_dates_carry_the_year_and_the_axis_its_unit(figures, tmp_path):
    index = pd.date_range("2024-03-04", periods=24, freq="5min")
    readings = pd.DataFrame({"s0": np.arange(24.0)}, index=index)
    plots.plot_sensors(readings, {"+5 min": readings + 1}, tmp_path / "s.png", "speed (mph)")
    ax = figures[0].axes[-1]
    label = ax.xaxis.get_major_formatter()(ax.get_xticks()[0])
    assert re.match(r"20\d\d-\d\d-\d\d \d\d:\d\d", label)
    assert figures[0].axes[0].get_ylabel() == "speed (mph)"


# --- inspect, --latest ----------------------------------------------------------------------
def test_inspect_of_a_pems_file_uses_the_datasets_start_or_says_it_assumed_one(tmp_path):
    paths = synthetic.write(tmp_path, nodes=4, days=1, seed=0, layout="pems", name="PEMS08")
    text = data_cli.inspect(str(paths["speeds"]))
    assert "2016-07-01 00:00:00 .." in text and "pems08's conventional start" in text
    other = tmp_path / "mine.npz"
    other.write_bytes(Path(paths["speeds"]).read_bytes())
    with pytest.warns(UserWarning, match="taken as 2000-01-01"):
        text = data_cli.inspect(str(other))
    assert "2000-01-01 00:00:00 .." in text and "start assumed, set --start" in text
    assert "2019-01-01 00:00:00 .." in data_cli.inspect(str(other), start="2019-01-01")


def test_latest_needs_seq_len_rows_as_the_readme_says(own_files, tmp_path, capsys):
    readings, edges = own_files
    rc, _, _ = _train(["--data", readings, "--adj", edges, "--adj-weights", "binary", "--epochs", "1",
                       "--batches-per-epoch", "1", "--out", tmp_path / "run", "--no-progress", *TINY], capsys)
    assert rc == 0
    readme = (ROOT / "README.md").read_text()
    rows = int(re.search(r"--latest` needs only the last `seq_len` readings \((\d+) rows", readme).group(1))
    table = pd.read_csv(readings, index_col=0)
    for n, expected in ((rows, 0), (rows - 1, 2)):
        table.tail(n).to_csv(tmp_path / f"live{n}.csv")
        rc = predict_cli.main([str(tmp_path / "run"), "--latest", "--data", str(tmp_path / f"live{n}.csv"),
                               "--out", str(tmp_path / f"now{n}"), "--device", "cpu", "--no-plots"])
        err = capsys.readouterr().err
        assert rc == expected, err
    assert f"{rows - 1} readings are too few" in err and err.count("\n") == 1
