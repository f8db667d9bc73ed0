"""gwnet-export: the exported .pt2 and ONNX files forecast as the run does, on their own."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from gwnet.cli.export import main as export_main
from gwnet.config import Config
from gwnet.data import synthetic
from gwnet.engine import export as export_module
from gwnet.engine import train
from gwnet.serve.forecaster import Forecaster


def tiny_run(data: Path, out: Path, adaptive: str) -> Path:
    cfg = Config.from_preset("improved")
    cfg.data.dataset = str(data)
    cfg.data.horizon = 4
    cfg.data.day_of_week = True  # the layout's one-hot calendar too
    m = cfg.model
    m.residual_channels = m.dilation_channels = 4
    m.skip_channels = m.end_channels = 8
    m.blocks = 1
    m.adaptive, m.adaptive_k = adaptive, 3
    t = cfg.train
    t.epochs, t.batches_per_epoch, t.progress, t.device, t.seed = 1, 2, False, "cpu", 0
    cfg.out = str(out)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("export")
    paths = synthetic.write(root / "data", nodes=6, days=3, seed=5)
    return SimpleNamespace(root=root, speeds=pd.read_hdf(paths["speeds"]),
                           dense=tiny_run(root / "data", root / "dense", "dense"),
                           topk=tiny_run(root / "data", root / "topk", "topk"))


def window_input(meta: dict, frame: pd.DataFrame) -> np.ndarray:
    """The exported file's input built from its metadata alone, as a user without gwnet would."""
    frame = frame[meta["sensor_ids"]].iloc[-meta["seq_len"]:]
    times = frame.index
    features = []
    for name in meta["input"]["features"]:
        if name == "reading":
            features.append(frame.to_numpy(np.float32))
        elif name == "time_of_day":
            minutes = times.hour * 60 + times.minute
            features.append(np.repeat((minutes / 1440.0).to_numpy()[:, None], frame.shape[1], 1))
        else:
            day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"].index(name.rsplit("_", 1)[1])
            features.append(np.repeat((times.day_of_week == day).astype(float)[:, None], frame.shape[1], 1))
    return np.stack(features, -1)[None].astype(np.float32)


def run_forecast(run: Path, frame: pd.DataFrame) -> np.ndarray:
    """What gwnet-predict --latest forecasts for these readings (the serving path, tested equal)."""
    result, _ = Forecaster([run]).forecast(frame)
    return result.prediction.numpy()


def export(run: Path, out: Path, fmt: str, capsys, *extra) -> tuple[int, str, str]:
    rc = export_main([str(run), "--format", fmt, "--out", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_pt2_forecasts_as_the_run_and_refuses_to_replace(runs, tmp_path, capsys):
    out = tmp_path / "dense.pt2"
    rc, printed, _ = export(runs.dense, out, "pt2", capsys)
    assert rc == 0 and "max abs difference" in printed
    extra = {"gwnet.json": ""}
    program = torch.export.load(out, extra_files=extra)
    meta = json.loads(extra["gwnet.json"])
    assert meta["sensor_ids"] == list(runs.speeds.columns) and meta["horizon"] == 4
    assert meta["input"]["features"][:2] == ["reading", "time_of_day"] and len(meta["input"]["features"]) == 9
    frame = runs.speeds.iloc[300:312].copy()
    frame.iloc[-1, 0] = 0.0  # missing
    with torch.no_grad():
        got = program.module()(torch.from_numpy(window_input(meta, frame))).numpy()
    expected = run_forecast(runs.dense, frame)
    print(f"pt2: max abs difference from the run {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # A batch of several windows too (the batch dimension is dynamic).
    two = torch.from_numpy(np.concatenate([window_input(meta, frame)] * 2))
    with torch.no_grad():
        assert program.module()(two).shape == (2, 4, 6)

    before = out.read_bytes()
    rc, _, err = export(runs.dense, out, "pt2", capsys)
    assert rc == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert out.read_bytes() == before
    assert export(runs.dense, out, "pt2", capsys, "--overwrite")[0] == 0


def test_onnx_of_a_sparse_topk_adjacency_forecasts_as_the_run(runs, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "topk.onnx"
    rc, printed, _ = export(runs.topk, out, "onnx", capsys)
    assert rc == 0, printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["gwnet"])
    assert meta["file_format"] == "onnx" and meta["max_abs_difference"] < 1e-4
    frame = runs.speeds.iloc[500:512]
    got = session.run(["forecast"], {"x": window_input(meta, frame)})[0]
    expected = run_forecast(runs.topk, frame)
    print(f"onnx: max abs difference from the run {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_a_graph_too_large_for_dense_supports_is_refused_in_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_DENSE_SUPPORT_BYTES", 100)
    out = tmp_path / "big.pt2"
    rc, _, err = export(runs.topk, out, "pt2", capsys)
    assert rc == 2 and err.count("\n") == 1 and "dense" in err and "topk" in err
    assert not out.exists()
