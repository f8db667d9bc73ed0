"""experiments/paper_table.py: the whole table on a tiny dataset (its shape, every model
against the last-value baseline, the files), a second invocation that reuses finished rows,
run directories made with other options, and the summary over seeds."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from gwnet.data import synthetic
from gwnet.errors import GWNetError

PNG = b"\x89PNG\r\n\x1a\n"
MODEL_ROWS = ("original", "improved", "finetuned", "ensemble")  # rows that forecast horizon 12


def load_runner() -> ModuleType:
    """The runner is a script, not part of the package: import it from its file."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "paper_table.py"
    spec = importlib.util.spec_from_file_location("paper_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


pt = load_runner()

# On top of the smoke budget: a model small enough for 8 sensors, trained for 6 whole epochs
# at a higher learning rate, so every model row clearly beats the last value at horizon 12
# (by 0.2-0.45 MAE on data seeds 0-4) in a few seconds per row.
TINY = {
    "model": {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 16, "end_channels": 16,
              "blocks": 2, "apt_size": 4},
    "train": {"batch_size": 32, "epochs": 6, "batches_per_epoch": None, "lr": 0.005, "progress": False},
}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("paper_table")
    synthetic.write(root / "data", nodes=8, days=4, seed=1)
    budget = pt.Budget.load("smoke").merged(TINY, name="smoke, tiny model")
    source = pt.data_source(str(root / "data"))
    result = pt.run_table(root / "out", budget=budget, source=source)
    return SimpleNamespace(out=root / "out", budget=budget, source=source, result=result)


def test_table_has_a_line_per_row_and_the_reported_columns(table):
    summary = table.result.summary
    metrics = [f"{m}_{h}" for h in ("h3", "h6", "h12", "mean") for m in ("mae", "rmse", "mape_pct")]
    assert list(summary.index) == list(pt.ROWS)
    assert list(summary.columns) == ["label", "seeds"] + [c for m in metrics for c in (m, m + "_std")]
    assert summary.shape == (7, 26)
    assert (summary["seeds"] == 1).all()
    # One seed: no spread; the short model has no horizon 12 and no comparable mean.
    assert summary.filter(like="_std").isna().all().all()
    assert summary.loc["short", ["mae_h12", "mae_mean"]].isna().all()
    assert summary.drop(index="short").filter(regex="^(mae|rmse|mape_pct)_[^_]+$").notna().all().all()
    lines = table.result.markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    body = [line for line in lines[header + 2:] if line.startswith("|")]
    assert len(body) == 7 and all(line.count("|") == 14 for line in lines[header:header + 9])
    assert "Budget smoke, tiny model" in lines[0] and "Model sizes differ" in lines[0]


def test_every_model_row_beats_the_last_value_at_horizon_12(table):
    summary = table.result.summary
    last_value = summary.loc["last_value", "mae_h12"]
    for row in MODEL_ROWS:
        assert summary.loc[row, "mae_h12"] < last_value, row


def test_files_written(table):
    out = table.out
    assert [p.name for p in table.result.files] == ["paper_table.md", "paper_table.csv", "per_horizon.csv",
                                                     "mae_by_horizon.png"]
    assert (out / "paper_table.md").read_text() == table.result.markdown
    csv = pd.read_csv(out / "paper_table.csv", index_col="row")
    pd.testing.assert_frame_equal(csv, table.result.summary, check_dtype=False, check_names=False)
    scores = pd.read_csv(out / "per_horizon.csv")
    assert len(scores) == 4 * 13 + 6 + 2 * 13  # 12 horizons + mean; short: 6 horizons, no mean
    assert (out / "mae_by_horizon.png").read_bytes()[:8] == PNG
    assert (out / "runs" / "ensemble" / "seed0" / "ensemble.json").exists()
    assert (out / "runs" / "finetuned" / "seed0" / "pretrain-h6" / "best.pt").exists()
    assert not list(out.rglob(".*.tmp"))


def test_second_invocation_reuses_finished_rows_and_trains_missing_ones(table, caplog):
    runs = table.out / "runs"
    kept = {row: (runs / row / "seed0" / "last.pt").stat().st_mtime_ns
            for row in ("original", "improved", "finetuned")}
    # A table run killed after three rows: the fourth row's run directory never finished.
    for path in sorted((runs / "short" / "seed0").iterdir()):
        if path.name != "config.json":
            path.unlink()
    with caplog.at_level(logging.INFO, logger="paper_table"):
        again = pt.run_table(table.out, budget=table.budget, source=table.source)
    for row, mtime in kept.items():
        assert f"{runs / row / 'seed0'}: complete, skipped" in caplog.text
        assert (runs / row / "seed0" / "last.pt").stat().st_mtime_ns == mtime
    assert f"{runs / 'short' / 'seed0'}: training" in caplog.text
    pd.testing.assert_frame_equal(again.summary.drop(index=["short", "ensemble"]),
                                  table.result.summary.drop(index=["short", "ensemble"]))


def test_run_directory_of_other_options_is_refused(table):
    budget = table.budget.merged({"train": {"epochs": 7}})
    with pytest.raises(GWNetError, match="other options .*train.epochs 6 there, 7 now"):
        pt.run_table(table.out, rows=["improved"], budget=budget, source=table.source)


def test_command_line_baselines_only(table, tmp_path, capsys):
    out = tmp_path / "baselines"
    code = pt.main(["--data", table.source["dataset"], "--out", str(out), "--rows", "last_value",
                    "historical_average", "--budget", "smoke"])
    assert code == 0
    summary = pd.read_csv(out / "paper_table.csv", index_col="row")
    assert list(summary.index) == ["last_value", "historical_average"]
    np.testing.assert_allclose(summary["mae_h12"], table.result.summary.loc[summary.index, "mae_h12"])
    assert "| Last value |" in capsys.readouterr().out
    assert not (out / "runs").exists()


def test_command_line_mistakes_are_one_line(capsys, tmp_path):
    assert pt.main(["--budget", "no-such-budget", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such budget" in err[0] and "smoke" in err[0]
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    assert pt.main(["--budget", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown option train.epoch" in capsys.readouterr().err


def test_summary_over_seeds_is_mean_and_std():
    frames = []
    for seed, mae in enumerate((2.0, 4.0)):
        per_horizon = pd.DataFrame({"horizon": [str(h) for h in range(1, 13)] + ["mean"], "mae": mae,
                                    "rmse": 2 * mae, "mape_pct": mae})
        frames.append(per_horizon.assign(row="improved", seed=seed))
    scores = pd.concat(frames, ignore_index=True)
    summary = pt.summarize(scores, ["improved"])
    assert summary.loc["improved", "seeds"] == 2
    assert summary.loc["improved", "mae_h12"] == pytest.approx(3.0)
    assert summary.loc["improved", "mae_h12_std"] == pytest.approx(np.std([2.0, 4.0], ddof=1))
    assert summary.loc["improved", "mape_pct_mean"] == pytest.approx(3.0)
    markdown = pt.to_markdown(summary, "caption")
    assert "| 3.00 \u00b1 1.41 | 6.00 \u00b1 2.83 | 3.00 \u00b1 1.41 |" in markdown


def test_mlp_row_is_trained_through_the_registry_and_ignores_gwnet_sizes(table, tmp_path):
    # The tiny budget's model options are Graph WaveNet's: the MLP row keeps its own sizes.
    result = pt.run_table(tmp_path / "mlp", rows=["mlp", "last_value"], budget=table.budget,
                          source=table.source)
    assert list(result.summary.index) == ["mlp", "last_value"]
    assert result.summary.loc["mlp", "label"] == pt.LABELS["mlp"]
    saved = json.loads((tmp_path / "mlp" / "runs" / "mlp" / "seed0" / "config.json").read_text())
    assert saved["arch"] == "mlp" and saved["model"]["hidden_channels"] == 128
    assert result.summary.loc["mlp", "mae_mean"] > 0 and np.isfinite(result.summary.loc["mlp", "mae_mean"])


def test_budget_model_option_of_no_row_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nresidual_chanels = 3\n")
    with pytest.raises(GWNetError, match="unknown option model.residual_chanels"):
        pt.Budget.load(str(bad))


def test_distilled_rows_learn_from_the_ensemble_rows_members(table):
    """The distilled rows reuse the table's ensemble members (same seed) as their teachers."""
    result = pt.run_table(table.out, rows=["ensemble", "distilled", "distilled_mlp"], budget=table.budget,
                          source=table.source)
    assert list(result.summary.index) == ["ensemble", "distilled", "distilled_mlp"]
    runs = table.out / "runs"
    for row, arch in (("distilled", "gwnet"), ("distilled_mlp", "mlp")):
        saved = json.loads((runs / row / "seed0" / "config.json").read_text())
        assert saved["arch"] == arch
        assert saved["train"]["teacher"] == [str((runs / m / "seed0").resolve()) for m in ("short", "finetuned")]
        assert np.isfinite(result.summary.loc[row, "mae_mean"])
    distilled = json.loads((runs / "distilled" / "seed0" / "config.json").read_text())["train"]
    assert distilled["init_from"] == str((runs / "finetuned" / "seed0").resolve())  # starts from the long member
    assert (runs / "distilled" / "seed0" / "teacher-cache" / "train.npy").exists()
