"""Distillation (gwnet-train --teacher, --shrink-from): the teacher cache against gwnet-predict,
no test window in it, alpha = 1 as ordinary training, exact resume, shrink's copied tensors,
and bad teachers as one line."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from gwnet.config import Config
from gwnet.data import Windows, load_data, synthetic
from gwnet.engine import Interrupted, RunDir, load_checkpoint, save_checkpoint, train
from gwnet.ensemble import Ensemble, load_members
from gwnet.ensemble.distill import CACHE_DIR, TeacherForecasts, score_beside
from gwnet.ensemble.distill import train as distil


def tiny(root: Path, out: Path, horizon: int = 12, channels: int = 8, **train_options) -> Config:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(root / "data")
    cfg.data.horizon = horizon
    m = cfg.model
    m.residual_channels = m.dilation_channels = channels
    m.skip_channels = m.end_channels = 8
    m.blocks, m.layers, m.apt_size = 2, 2, 4
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.batch_size, t.progress, t.device = 2, 4, 32, False, "cpu"
    for name, value in train_options.items():
        setattr(t, name, value)
    cfg.out = str(out)
    return cfg


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> SimpleNamespace:
    """A short (1-6) and a long (1-12) teacher on the same tiny data."""
    root = tmp_path_factory.mktemp("distill")
    synthetic.write(root / "data", nodes=5, days=2, seed=3)
    h6 = train(tiny(root, root / "h6", horizon=6, channels=4, seed=1)).run_dir
    h12 = train(tiny(root, root / "h12", seed=2)).run_dir
    return SimpleNamespace(root=root, h6=h6, h12=h12, both=[str(h6), str(h12)])


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(RunDir(a).best)["model"], load_checkpoint(RunDir(b).best)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def snapshot(runs) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for run in runs for p in Path(run).rglob("*")}


def test_cached_forecasts_equal_gwnet_predict(teachers, tmp_path):
    from gwnet.cli.predict import main as predict

    cfg = tiny(teachers.root, tmp_path / "student", teacher=teachers.both, epochs=1, batches_per_epoch=2)
    before = snapshot(teachers.both)
    distil(cfg)
    assert snapshot(teachers.both) == before  # the teacher runs are only read
    assert predict([*teachers.both, "--split", "all", "--format", "parquet", "--no-plots", "--device", "cpu",
                    "--out", str(tmp_path / "predicted")]) == 0
    table = pd.read_parquet(tmp_path / "predicted" / "predictions.parquet")
    nodes, horizons = table["sensor_id"].nunique(), table["horizon"].max()
    predicted = table["prediction"].to_numpy().reshape(-1, horizons, nodes)  # rows: origin, horizon, sensor
    data = load_data(cfg.data)
    cache = tmp_path / "student" / CACHE_DIR
    for split in ("train", "val"):
        cached = np.load(cache / f"{split}.npy")
        w = data.windows[split]
        assert cached.shape == (len(w), 12, 5)
        origins = table["origin_time"].to_numpy()[:: horizons * nodes][w.start:w.stop]
        np.testing.assert_array_equal(origins, w.origins.to_numpy())
        np.testing.assert_array_equal(cached, predicted[w.start:w.stop])
    meta = json.loads((cache / "teacher.json").read_text())
    assert meta["identity"]["teachers"] == [str(Path(p).resolve()) for p in teachers.both]
    saved = json.loads((tmp_path / "student" / "config.json").read_text())["train"]
    assert (saved["teacher"], saved["teacher_strategy"], saved["distill_mode"], saved["distill_alpha"]) == (
        meta["identity"]["teachers"], "per-horizon", "kd", 0.5)


def test_cache_holds_no_test_window(teachers, tmp_path, monkeypatch):
    """Every window the teachers read while the cache is built (their validation fit included)
    lies before the test split, and the cache holds exactly the train and validation windows."""
    cfg = tiny(teachers.root, tmp_path / "student", teacher=teachers.both)
    data = load_data(cfg.data)
    cfg.resolve(num_nodes=data.num_nodes)
    read: list[int] = []
    batch = Windows.batch

    def spy(self, positions, scaler=None):
        read.append(self.start + int(positions.max()))
        return batch(self, positions, scaler)

    monkeypatch.setattr(Windows, "batch", spy)
    forecasts = TeacherForecasts(cfg, data)
    forecasts.load(torch.device("cpu"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".train.npy.gwnet-k1lled.tmp").write_bytes(b"half")  # a killed run's
    (tmp_path / "cache" / ".notes.tmp").write_text("mine")  # a user's own file: never swept
    forecasts._write(tmp_path / "cache")
    assert read and max(read) < data.windows["test"].start
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".notes.tmp", "teacher.json", "train.npy", "val.npy"]
    for split in ("train", "val"):
        assert np.load(tmp_path / "cache" / f"{split}.npy").shape == (len(data.windows[split]), 12, 5)
    with pytest.raises(ValueError, match="never forecasts test"):
        next(forecasts.forecasts("test"))


def test_alpha_one_is_ordinary_training(teachers, tmp_path):
    plain = train(tiny(teachers.root, tmp_path / "plain", seed=5))
    taught = distil(tiny(teachers.root, tmp_path / "taught", seed=5, teacher=teachers.both, distill_alpha=1.0))
    same_weights(plain.run_dir, taught.run_dir)
    pd.testing.assert_frame_equal(plain.test_metrics, taught.test_metrics)
    pd.testing.assert_frame_equal(plain.history.drop(columns="seconds"), taught.history.drop(columns="seconds"))
    # ... while alpha < 1 does learn from the teachers.
    half = distil(tiny(teachers.root, tmp_path / "half", seed=5, teacher=teachers.both, distill_alpha=0.5))
    assert not plain.history["train_mae"].equals(half.history["train_mae"])


@pytest.mark.parametrize("mode", ["pseudo", "fill"])
def test_other_modes_train(teachers, tmp_path, mode):
    result = distil(tiny(teachers.root, tmp_path / mode, teacher=teachers.both, distill_mode=mode, epochs=1))
    assert np.isfinite(result.test_metrics.loc["mean", "mae"])


def test_resume_mid_epoch_is_exact_and_reuses_the_cache(teachers, tmp_path, monkeypatch):
    options = dict(teacher=teachers.both, distill_alpha=0.3, seed=7)
    whole = distil(tiny(teachers.root, tmp_path / "whole", **options))
    cfg = tiny(teachers.root, tmp_path / "cut", **options)
    prepare, targets = TeacherForecasts.prepare, TeacherForecasts.targets
    calls = {"n": 0}

    def keep_trainer(self, trainer):
        self.trainer = trainer
        prepare(self, trainer)

    def interrupting(self, split, positions):
        calls["n"] += 1
        if calls["n"] == cfg.train.batches_per_epoch + 2:  # mid-epoch 2
            self.trainer._stop_signal = signal.SIGTERM
        return targets(self, split, positions)

    monkeypatch.setattr(TeacherForecasts, "prepare", keep_trainer)
    monkeypatch.setattr(TeacherForecasts, "targets", interrupting)
    with pytest.raises(Interrupted):
        distil(cfg)
    monkeypatch.undo()
    state = load_checkpoint(RunDir(cfg.out).last)
    assert state["epoch"] == 1 and state["partial"]["next_batch"] == 2
    cached = (Path(cfg.out) / CACHE_DIR / "train.npy").stat().st_mtime_ns

    def no_reload(self, device):
        raise AssertionError("a resumed run must reuse its cached forecasts")

    monkeypatch.setattr(TeacherForecasts, "load", no_reload)
    resumed = distil(cfg, resume=True)
    assert (Path(cfg.out) / CACHE_DIR / "train.npy").stat().st_mtime_ns == cached
    same_weights(whole.run_dir, resumed.run_dir)
    pd.testing.assert_frame_equal(whole.test_metrics, resumed.test_metrics)


def test_shrink_copies_the_mapped_tensors(teachers, tmp_path):
    """Two blocks of two layers, 8 channels -> two blocks of one layer, 4 channels: student
    layer 1 (block 1, dilation 1) is teacher layer 2; channels are the leading ones of each
    group (gated filter/gate rows, graph-conv input blocks)."""
    from gwnet.engine import Trainer

    cfg = tiny(teachers.root, tmp_path / "small", channels=4, shrink_from=str(teachers.h12))
    cfg.model.layers, cfg.model.skip_channels, cfg.model.end_channels = 1, 6, 5
    trainer = Trainer(cfg)
    trainer.close()
    s = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    t = load_checkpoint(RunDir(teachers.h12).best)["model"]
    gate = lambda w: torch.cat([w[0:4], w[8:12]])  # noqa: E731  filter rows 0-3, gate rows 8-11
    expected = {
        "start_conv.weight": t["start_conv.weight"][:4], "start_conv.bias": t["start_conv.bias"][:4],
        "cat_feature_conv.weight": t["cat_feature_conv.weight"][:4],
        "cat_feature_conv.bias": t["cat_feature_conv.bias"][:4],
        "adaptive.nodevec1": t["adaptive.nodevec1"], "adaptive.nodevec2": t["adaptive.nodevec2"],
        "end_conv_1.weight": t["end_conv_1.weight"][:5, :6], "end_conv_1.bias": t["end_conv_1.bias"][:5],
        "end_conv_2.weight": t["end_conv_2.weight"][:, :5], "end_conv_2.bias": t["end_conv_2.bias"],
    }
    for mine, theirs in ((0, 0), (1, 2)):
        expected[f"layers.{mine}.temporal.weight"] = gate(t[f"layers.{theirs}.temporal.weight"][:, :4])
        expected[f"layers.{mine}.temporal.bias"] = gate(t[f"layers.{theirs}.temporal.bias"])
        expected[f"layers.{mine}.skip.weight"] = t[f"layers.{theirs}.skip.weight"][:6, :4]
        expected[f"layers.{mine}.skip.bias"] = t[f"layers.{theirs}.skip.bias"][:6]
    g = t["layers.0.graph_conv.weight"]  # (8, blocks x 8): the leading 4 inputs of each block
    expected["layers.0.graph_conv.weight"] = torch.cat([g[:4, k:k + 4] for k in range(0, g.shape[1], 8)], 1)
    expected["layers.0.graph_conv.bias"] = t["layers.0.graph_conv.bias"][:4]
    for name in ("weight", "bias", "running_mean", "running_var"):
        expected[f"layers.0.norm.{name}"] = t[f"layers.0.norm.{name}"][:4]
    expected["layers.0.norm.num_batches_tracked"] = t["layers.0.norm.num_batches_tracked"]
    assert s.keys() == expected.keys()  # the last layer has no graph convolution nor norm
    for key, value in expected.items():
        assert torch.equal(s[key], value), key
    # The teacher run is only read.
    assert not (Path(teachers.h12) / CACHE_DIR).exists()


def rewrite_best(run: Path, change) -> Path:
    state = load_checkpoint(RunDir(run).best)
    change(state)
    save_checkpoint(RunDir(run).best, {k: v for k, v in state.items() if not k.startswith(("format", "gwnet_"))})
    RunDir(run).config.write_text(json.dumps(state["config"]))
    return run


def other_step(state):
    state["config"]["data"]["step_minutes"] = 10


def other_sensors(state):
    state["sensor_ids"] = [f"x{i}" for i in range(len(state["sensor_ids"]))]


@pytest.mark.parametrize("case,message", [
    ("empty", "no best.pt"),
    ("unfinished", "not a finished run"),
    ("step", "10-minute readings"),
    ("sensors", "sensors"),
    ("horizons", "may not forecast further than its teachers"),
    ("alpha", "distill_alpha must be in"),
])
def test_bad_teachers_are_one_line_and_write_nothing(teachers, tmp_path, capsys, case, message):
    from gwnet.cli.train import main

    teacher = tmp_path / "teacher"
    if case == "empty":
        teacher.mkdir()
    elif case != "horizons":
        shutil.copytree(teachers.h12, teacher)
    if case == "unfinished":
        (teacher / "test_metrics.csv").unlink()
    elif case == "step":
        rewrite_best(teacher, other_step)
    elif case == "sensors":
        rewrite_best(teacher, other_sensors)
    given = [str(teachers.h6)] if case == "horizons" else [str(teacher)]
    extra = ["--distill-alpha", "1.5"] if case == "alpha" else []
    out = tmp_path / "student"
    argv = ["--dataset", str(teachers.root / "data"), "--out", str(out), "--teacher", *given, *extra,
            "--residual-channels", "4", "--dilation-channels", "4", "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("gwnet-train: error:"), err
    assert not out.exists()


def test_cli_shrink_then_distil(teachers, tmp_path, capsys):
    from gwnet.cli.train import main

    out = tmp_path / "small"
    argv = ["--dataset", str(teachers.root / "data"), "--out", str(out), "--teacher", *teachers.both,
            "--shrink-from", str(teachers.h12), "--distill-mode", "fill", "--residual-channels", "8",
            "--dilation-channels", "8", "--skip-channels", "8", "--end-channels", "8", "--apt-size", "4",
            "--blocks", "1", "--layers", "2", "--epochs", "1", "--batches-per-epoch", "2", "--batch-size", "32",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["shrink_from"] == str(teachers.h12) and saved["model"]["blocks"] == 1
    assert saved["train"]["distill_mode"] == "fill"
    # gwnet-predict: the student beside its teachers' ensemble, scored on the same test windows.
    from gwnet.cli.predict import main as predict

    capsys.readouterr()
    assert predict([*teachers.both, "--beside", str(out), "--out", str(tmp_path / "side"), "--no-plots",
                    "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[next(i for i, line in enumerate(lines) if line.startswith("MAE")) + 1]
    assert header.split()[:5] == ["h6", "h12", "ensemble", "small", "(beside)"]
    members, data = load_members(teachers.both)
    scored = score_beside([out], Ensemble(members, "mean"), data.windows["test"], 32, torch.device("cpu"))
    own = pd.read_csv(RunDir(out).test_metrics, index_col=0).drop(index="mean")["mae"].to_numpy()
    np.testing.assert_allclose(scored["small"]["mae"].to_numpy(), own, rtol=1e-6)


def test_student_of_a_quantile_teacher_learns_its_median(teachers, tmp_path):
    from gwnet.engine import forecast, load_trained

    cfg = tiny(teachers.root, tmp_path / "q", epochs=1, batches_per_epoch=2)
    cfg.model.quantiles = (0.1, 0.5, 0.9)
    quantile = train(cfg).run_dir
    student = tiny(teachers.root, tmp_path / "student", teacher=[str(quantile)], distill_mode="pseudo", epochs=1,
                   batches_per_epoch=2)
    distil(student)
    model, qcfg, scaler, _ = load_trained(quantile)
    data = load_data(student.data)
    x, _ = data.windows["train"].batch(torch.arange(32), scaler=scaler)
    with torch.no_grad():
        full = model(x)  # (B, H, quantiles, N) in scaled units
    median = forecast(model, x, scaler, qcfg.train, torch.device("cpu"))
    assert full.dim() == 4 and median.shape == (32, 12, 5)
    cached = np.load(tmp_path / "student" / CACHE_DIR / "train.npy")[:32]
    np.testing.assert_array_equal(cached, median.numpy())
    lower = scaler.inverse_transform(full[:, :, 0].float()).clamp(qcfg.train.clamp_min, qcfg.train.clamp_max)
    assert not np.array_equal(cached, lower.numpy())


def test_targets_script_runs_at_tiny_size(tmp_path, capsys):
    """experiments/distill.py end to end on a tiny budget: every row, the table and the targets."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "distill.py"
    spec = importlib.util.spec_from_file_location("distill_experiment", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--nodes", "5", "--days", "2", "--epochs", "1", "--batches", "2",
                        "--channels", "4"]) == 0
    text = (tmp_path / "distill.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [line.split("|")[1].strip() for line in table] == list(script.ROWS)
    assert "Room to distil" in text and text.count("\n- ") == 3
    per_seed = pd.read_csv(tmp_path / "distill.csv")
    assert len(per_seed) == len(script.ROWS) and (per_seed["samples/s"] > 0).all()
    saved = json.loads((tmp_path / "runs" / "shrunk" / "seed0" / "config.json").read_text())
    assert saved["model"]["blocks"] == 2 and saved["train"]["shrink_from"].endswith("long/seed0")


@pytest.mark.parametrize("extra,message", [
    (["--blocks", "3"], "must not be larger than the teacher: blocks 3"),
    (["--order", "1"], "does not match this run's beyond its size (order 2 vs 1)"),
    (["--model", "mlp"], "shrink_from maps Graph WaveNet layers"),
])
def test_shrink_mismatch_is_one_line(teachers, tmp_path, capsys, extra, message):
    from gwnet.cli.train import main

    argv = ["--dataset", str(teachers.root / "data"), "--out", str(tmp_path / "s"), "--shrink-from",
            str(teachers.h12), "--epochs", "1", "--device", "cpu", "--no-progress", *extra]
    if "mlp" not in extra:
        argv += ["--residual-channels", "8", "--dilation-channels", "8", "--skip-channels", "8",
                 "--end-channels", "8", "--apt-size", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("gwnet-train: error:"), err
    assert not (tmp_path / "s" / "config.json").exists()
