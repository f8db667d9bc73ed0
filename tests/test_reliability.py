"""Hostile inputs, killed runs and unwritable outputs: nothing is lost, nothing is silent."""
from __future__ import annotations

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_speeds
from gwnet.cli.data import main as data_main
from gwnet.engine import RunDir, load_checkpoint, save_checkpoint
from gwnet.engine.pipeline import run_finished
from gwnet.errors import GWNetError


# --- a generator of broken inputs ------------------------------------------------------------
def _h5(df, **kw):
    def write(path):
        df.to_hdf(path, key="df", **kw)
    return write


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _text(data: str):
    return lambda path: path.write_text(data)


def _pickle(obj):
    return lambda path: path.write_bytes(pickle.dumps(obj, protocol=2))


def _truncated_h5(path):
    make_speeds(3000, 30).to_hdf(path, key="df")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _no_frames_h5(path):
    with h5py.File(path, "w") as h5:
        h5["x"] = np.arange(3)


def _strings_h5(path):
    df = make_speeds(10, 2).astype(object)
    df.iloc[0, 0] = "fast"
    df.to_hdf(path, key="df")


def _with(df_change):
    df = make_speeds(30, 3)
    return df_change(df)


def _reindexed(order):
    df = make_speeds(30, 3)
    return df.iloc[order]


IDX = pd.date_range("2012-03-01", periods=6, freq="5min")
GOOD_IDS = ["a", "b"]
# (file name, writer, expected message fragment); every case must end in one line, exit 2.
BROKEN = [
    ("zero.h5", _bytes(b""), "file is empty"),
    ("trunc.h5", _truncated_h5, "trunc.h5"),
    ("text.h5", _text("hello"), "not a readable HDF5"),
    ("noframe.h5", _no_frames_h5, "holds no pandas frame"),
    ("table.h5", _h5(make_speeds(10, 2), format="table"), "only pandas' fixed format"),
    ("strings.h5", _strings_h5, "not numeric"),
    ("unsorted.h5", _h5(_reindexed(list(range(29, -1, -1)))), "not sorted"),
    ("dupts.h5", _h5(_reindexed([0, 1, 1, 2, 3])), "duplicate timestamp"),
    ("inf.h5", _h5(_with(lambda d: d.replace(d.iloc[3, 1], np.inf))), "infinite"),
    ("neg.h5", _h5(_with(lambda d: d * -1)), "negative speeds"),
    ("offgrid.csv", _text("t,a\n2012-01-01 00:00,1\n2012-01-01 00:07,2\n"), "5-minute grid"),
    ("empty.csv", _text(""), "empty"),
    ("words.csv", _text("t,a,b\n2012-01-01 00:00,1,x\n"), "'b' is not numeric"),
    ("dupid.csv", _text("t,a,b,a\n2012-01-01 00:00,1,2,3\n"), "duplicate sensor id 'a'"),
    ("notime.csv", _text("t,a\nmonday,1\n"), "timestamps"),
    ("nosuch.h5", None, "no such data file"),
    ("graph.pkl", _pickle({"not": "a triple"}), "DCRNN triple"),
    ("trunc.pkl", lambda p: p.write_bytes(pickle.dumps([GOOD_IDS, {"a": 0, "b": 1}, np.eye(2)])[:30]),
     "not a readable adjacency pickle"),
    ("empty.pkl", _bytes(b""), "graph file is empty"),
    ("evil.pkl", lambda p: p.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR."), "refusing to load"),
    ("rect.pkl", _pickle([GOOD_IDS, {"a": 0, "b": 1}, np.ones((2, 3))]), "square"),
    ("size.pkl", _pickle([GOOD_IDS, {"a": 0, "b": 1}, np.ones((3, 3))]), "lists 2 sensor ids"),
    ("negw.pkl", _pickle([GOOD_IDS, {"a": 0, "b": 1}, -np.eye(2)]), "negative"),
    ("nanw.pkl", _pickle([GOOD_IDS, {"a": 0, "b": 1}, np.full((2, 2), np.nan)]), "NaN"),
    ("dupg.pkl", _pickle([["a", "a"], {"a": 0}, np.eye(2)]), "duplicate sensor ids"),
    ("distances.csv", _text("a,b,-5\n"), "negative road distance"),
]


@pytest.mark.parametrize("name,writer,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_input_is_one_clear_line(tmp_path, capsys, name, writer, message):
    path = tmp_path / name
    if writer is not None:
        writer(path)
        capsys.readouterr()  # what writing the fixture printed is not under test
    assert data_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gwnet-data: error: ") and str(path) in err, err
    assert message in err and "\n" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("change,warning", [
    (lambda d: d.mask(d > 60), "NaN readings treated as missing"),
    (lambda d: d.drop(d.index[5:9]), "missing 5-minute steps filled"),
])
def test_documented_repairs_warn(tmp_path, capsys, change, warning):
    path = tmp_path / "repaired.h5"
    change(make_speeds(40, 3)).to_hdf(path, key="df")
    with pytest.warns(UserWarning, match=warning):
        assert data_main(["inspect", str(path)]) == 0
    assert "steps     40" in capsys.readouterr().out


def test_graph_that_does_not_cover_the_data(tmp_path):
    from gwnet.config import DataConfig
    from gwnet.data import load_data

    make_speeds(400, 3).to_hdf(tmp_path / "s.h5", key="df")
    with open(tmp_path / "g.pkl", "wb") as fh:
        pickle.dump([["s0", "s1"], {"s0": 0, "s1": 1}, np.eye(2)], fh, protocol=2)
    with pytest.raises(GWNetError, match=r"g.pkl: 1 sensor\(s\) of the data are not in the graph: s2"):
        load_data(DataConfig(data=str(tmp_path / "s.h5"), adj=str(tmp_path / "g.pkl")))


# --- checkpoints ------------------------------------------------------------------------------
class Opaque:
    """An arbitrary object: a checkpoint holding one must never be unpickled."""


def test_checkpoint_versions_and_foreign_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.ones(1)})
    assert load_checkpoint(path)["format_version"] == 1
    newer = torch.load(path, weights_only=True)
    newer["format_version"] = 99
    torch.save(newer, path)
    with pytest.raises(GWNetError, match="format 99 is newer than this gwnet"):
        load_checkpoint(path)
    torch.save({"start_conv.weight": torch.ones(1)}, path)
    with pytest.raises(GWNetError, match="not a gwnet checkpoint"):
        load_checkpoint(path)
    torch.save({"format": "gwnet-checkpoint", "obj": Opaque()}, path)
    with pytest.raises(GWNetError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(GWNetError, match="No space left on device.*previous one is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_unwritable_run_directory_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(GWNetError, match="cannot write the run directory"):
        RunDir(tmp_path / "file" / "run").check_writable()


# --- SIGKILL at random points, then --resume ------------------------------------------------
TRAIN_ARGS = ["--epochs", "6", "--residual-channels", "8", "--dilation-channels", "8",
              "--skip-channels", "16", "--end-channels", "16", "--blocks", "2", "--apt-size", "4",
              "--batch-size", "32", "--no-progress"]


def _train(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "gwnet", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _check_intact(run: RunDir, printed_epochs: int) -> None:
    """After a kill: every file that exists is whole, and no printed epoch is lost."""
    if run.config.exists():
        assert "model" in run.config.read_text()
    if run.last.exists():
        state = load_checkpoint(run.last)
        assert state["epoch"] >= printed_epochs
        if run.metrics.exists():  # derived from last.pt, written just after it
            assert len(pd.read_csv(run.metrics)) in (state["epoch"] - 1, state["epoch"])
    if run.best.exists():
        load_checkpoint(run.best)


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    from gwnet.data import synthetic

    synthetic.write(tmp_path / "data", nodes=6, days=3, seed=5)
    common = ["--dataset", str(tmp_path / "data"), *TRAIN_ARGS]
    started = time.perf_counter()
    straight = _train(*common, "--out", str(tmp_path / "straight"))
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    duration = time.perf_counter() - started  # kill points scale with this machine's speed

    rng = random.Random(0)
    run = RunDir(tmp_path / "killed")
    proc = _train(*common, "--out", str(run.root))
    kills = 0
    for _ in range(3):
        time.sleep(rng.uniform(0.25, 0.8) * duration)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        kills += 1
        _check_intact(run, out.count("val mae"))
        if run_finished(run.root):  # the kill came as the run was exiting
            proc = None
            break
        proc = _train("--resume", str(run.root)) if run.config.exists() else _train(*common, "--out", str(run.root))
    if proc is not None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert kills >= 1, "the run finished before any kill; lengthen it"
    assert len(pd.read_csv(run.metrics)) == len(pd.read_csv(RunDir(tmp_path / "straight").metrics))
    pd.testing.assert_frame_equal(pd.read_csv(run.test_metrics), pd.read_csv(RunDir(tmp_path / "straight").test_metrics))
    a = load_checkpoint(run.best)["model"]
    b = load_checkpoint(RunDir(tmp_path / "straight").best)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_position_and_exits_cleanly(tmp_path):
    from gwnet.data import synthetic

    synthetic.write(tmp_path / "data", nodes=6, days=3, seed=5)
    run = RunDir(tmp_path / "run")
    proc = _train("--dataset", str(tmp_path / "data"), *TRAIN_ARGS, "--out", str(run.root))
    deadline = time.time() + 120
    while not run.last.exists() and time.time() < deadline:  # let it reach its first epoch
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "resume with gwnet-train --resume" in err
    assert not load_checkpoint(run.last)["finished"]
    resumed = _train("--resume", str(run.root))
    assert resumed.wait(timeout=300) == 0
    assert Path(run.test_metrics).exists()
