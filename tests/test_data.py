"""Readers, graphs, supports, windows, splits and the scaler, against independent computations."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_adj, make_speeds
from gwnet.config import DataConfig
from gwnet.data import build_supports, check_speeds, load_data, read_graph, read_speeds, split_sizes
from gwnet.data.graph import SensorGraph, align_graph, gaussian_kernel_adjacency
from gwnet.data.windows import build_series, make_splits
from gwnet.errors import GWNetError


# --- readers ----------------------------------------------------------------------------
def test_h5_read_with_h5py_equals_pandas(tmp_path):
    df = make_speeds(50, 4)
    path = tmp_path / "metr.h5"
    df.astype(np.float64).to_hdf(path, key="df")
    got = read_speeds(path)
    ref = pd.read_hdf(path, "df")
    assert got.dtypes.unique().tolist() == [np.float32]
    np.testing.assert_array_equal(got.to_numpy(), ref.to_numpy().astype(np.float32))
    assert (got.index == ref.index).all() and list(got.columns) == list(ref.columns)


def test_h5_integer_sensor_ids_and_key(tmp_path):
    df = make_speeds(30, 3)
    df.columns = [400001, 400017, 400030]
    path = tmp_path / "pems-bay.h5"
    df.to_hdf(path, key="speed")
    make_speeds(30, 2).to_hdf(path, key="other")
    with pytest.raises(GWNetError, match="several frames.*--key"):
        read_speeds(path)
    got = read_speeds(path, key="speed")
    assert list(got.columns) == ["400001", "400017", "400030"]
    with pytest.raises(GWNetError, match="no frame under key 'nope'"):
        read_speeds(path, key="nope")


def test_csv_and_parquet(tmp_path):
    df = make_speeds(40, 3)
    df.to_csv(tmp_path / "s.csv")
    df.to_parquet(tmp_path / "s.parquet")
    for name in ("s.csv", "s.parquet"):
        got = read_speeds(tmp_path / name)
        np.testing.assert_allclose(got.to_numpy(), df.to_numpy(), rtol=1e-6)
        assert (got.index == df.index).all()


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"\x89HDF\r\n\x1a\n" + b"\0" * 20, "not a readable HDF5"),
    (b"this is not hdf5 at all", "not a readable HDF5"),
])
def test_broken_h5(tmp_path, content, match):
    path = tmp_path / "x.h5"
    path.write_bytes(content)
    with pytest.raises(GWNetError, match=match) as err:
        read_speeds(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_h5(tmp_path):
    path = tmp_path / "t.h5"
    make_speeds(2000, 20).to_hdf(path, key="df")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GWNetError, match=str(path.name)):
        read_speeds(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(GWNetError, match="no such data file"):
        read_speeds(tmp_path / "nope.h5")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(GWNetError, match="must be .h5"):
        read_speeds(tmp_path / "x.txt")


def _frame(values, index=None):
    index = index if index is not None else pd.date_range("2012-03-01", periods=len(values), freq="5min")
    return pd.DataFrame(np.asarray(values, dtype=float), index=index, columns=["a", "b"][: np.shape(values)[1]])


def test_check_speeds_errors():
    idx = pd.date_range("2012-03-01", periods=4, freq="5min")
    with pytest.raises(GWNetError, match="not sorted"):
        check_speeds(_frame([[1, 2]] * 4, idx[::-1]))
    with pytest.raises(GWNetError, match="duplicate timestamp"):
        check_speeds(_frame([[1, 2]] * 4, idx[[0, 1, 1, 2]]))
    with pytest.raises(GWNetError, match="5-minute grid"):
        check_speeds(_frame([[1, 2]] * 4, pd.date_range("2012-03-01", periods=4, freq="7min")))
    with pytest.raises(GWNetError, match="negative"):
        check_speeds(_frame([[1, 2], [3, -1]]))
    with pytest.raises(GWNetError, match="infinite"):
        check_speeds(_frame([[1, 2], [3, np.inf]]))
    with pytest.raises(GWNetError, match="duplicate sensor id"):
        check_speeds(pd.DataFrame([[1.0, 2.0]], index=idx[:1], columns=["a", "a"]))
    with pytest.raises(GWNetError, match="not numeric"):
        check_speeds(pd.DataFrame({"a": ["x", "y"]}, index=idx[:2]))
    with pytest.raises(GWNetError, match="no rows"):
        check_speeds(pd.DataFrame(columns=["a"], dtype=float))


def test_check_speeds_repairs_nan_and_gaps():
    idx = pd.date_range("2012-03-01", periods=5, freq="5min")[[0, 1, 3, 4]]
    with pytest.warns(UserWarning) as caught:
        out = check_speeds(_frame([[1, np.nan], [2, 3], [4, 5], [6, 7]], idx))
    messages = " ".join(str(w.message) for w in caught)
    assert "NaN" in messages and "missing 5-minute steps" in messages
    assert len(out) == 5 and out.iloc[2].tolist() == [0.0, 0.0] and out.iloc[0, 1] == 0.0


# --- graphs ----------------------------------------------------------------------------
def test_pickle_graph_and_reordering_dict(tmp_path):
    adj = make_adj(3)
    path = tmp_path / "adj.pkl"
    # rows belong to ids by the dict, not by list order
    with open(path, "wb") as fh:
        pickle.dump([["b", "a", "c"], {"a": 0, "b": 1, "c": 2}, adj], fh, protocol=2)
    g = read_graph(path)
    assert g.sensor_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(g.adj, adj)
    aligned = align_graph(g, ["c", "a", "b"])
    np.testing.assert_array_equal(aligned.adj, adj[np.ix_([2, 0, 1], [2, 0, 1])])


def test_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "adj.pkl"
    path.write_bytes(pickle.dumps([["a"], {"a": 0}, Evil()]))
    with pytest.raises(GWNetError, match="refusing to load builtins.print"):
        read_graph(path)


@pytest.mark.parametrize("obj,match", [
    ({"a": 1}, "DCRNN triple"),
    ([["a", "b"], {"a": 0, "b": 1}, np.ones((2, 3))], "square"),
    ([["a", "b", "c"], {"a": 0, "b": 1, "c": 2}, np.ones((2, 2))], "lists 3 sensor ids"),
    ([["a", "a"], {"a": 0}, np.ones((2, 2))], "duplicate sensor ids"),
    ([["a", "b"], {"a": 0, "b": 1}, -np.ones((2, 2))], "negative"),
])
def test_bad_pickles(tmp_path, obj, match):
    path = tmp_path / "adj.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(GWNetError, match=match):
        read_graph(path)


def test_alignment_mismatch_is_refused():
    g = SensorGraph(["a", "b"], np.eye(2))
    with pytest.raises(GWNetError, match="1 sensor\\(s\\) of the data are not in the graph: z"):
        align_graph(g, ["a", "z"])
    with pytest.warns(UserWarning, match="1 graph sensor"):
        assert align_graph(g, ["b"]).sensor_ids == ["b"]


def test_distances_csv_kernel(tmp_path):
    path = tmp_path / "distances.csv"
    path.write_text("from,to,distance\na,a,0\na,b,100\nb,a,300\nb,c,\n")
    g = read_graph(path)
    assert g.sensor_ids == ["a", "b", "c"]
    std = np.std([0.0, 100.0, 300.0])
    expected = np.zeros((3, 3))
    expected[0, 0] = 1.0
    expected[0, 1] = np.exp(-(100 / std) ** 2)
    expected[1, 0] = np.exp(-(300 / std) ** 2)
    expected[expected < 0.1] = 0
    np.testing.assert_allclose(g.adj, expected, rtol=1e-6)
    headerless = tmp_path / "d2.csv"
    headerless.write_text("a,a,0\na,b,100\nb,a,300\n")
    np.testing.assert_allclose(read_graph(headerless, sensor_ids=["a", "b", "c"]).adj, expected, rtol=1e-6)


def test_distances_csv_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(GWNetError, match="empty"):
        read_graph(empty)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,far\n")
    with pytest.raises(GWNetError, match="'far' is not a number"):
        read_graph(bad)


def test_real_graphs(shared_graphs):
    la = read_graph(shared_graphs / "adj_mx.pkl")
    assert la.num_nodes == 207 and 0.03 < la.density < 0.05
    ids = (shared_graphs / "graph_sensor_ids.txt").read_text().strip().split(",")
    assert la.sensor_ids == ids
    bay = read_graph(shared_graphs / "adj_mx_bay.pkl")
    assert bay.num_nodes == 325
    # DCRNN's published PEMS-BAY adjacency is exactly the kernel of its distances file.
    rebuilt = read_graph(shared_graphs / "distances_bay_2017.csv", sensor_ids=bay.sensor_ids)
    np.testing.assert_allclose(rebuilt.adj, bay.adj, atol=1e-6)


# --- supports --------------------------------------------------------------------------
A = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 2.0], [0.0, 3.0, 1.0]])


def test_supports_hand_computed():
    dense = lambda mats: [m.toarray() for m in mats]  # noqa: E731
    p_fwd = np.array([[0, 1, 0], [0.5, 0, 0.5], [0, 0.75, 0.25]])
    col = A.T / A.T.sum(1, keepdims=True)
    fwd, bwd = dense(build_supports(A, "doubletransition"))
    np.testing.assert_allclose(fwd, p_fwd, rtol=1e-6)
    np.testing.assert_allclose(bwd, col, rtol=1e-6)
    np.testing.assert_allclose(dense(build_supports(A, "transition"))[0], p_fwd, rtol=1e-6)
    d = 1 / np.sqrt(A.sum(1))
    sym = np.diag(d) @ A.T @ np.diag(d)
    np.testing.assert_allclose(dense(build_supports(A, "symnadj"))[0], sym, rtol=1e-6)
    np.testing.assert_allclose(dense(build_supports(A, "normlap"))[0], np.eye(3) - sym, rtol=1e-6, atol=1e-7)
    s = np.maximum(A, A.T)
    ds = 1 / np.sqrt(s.sum(1))
    lap = np.eye(3) - np.diag(ds) @ s @ np.diag(ds)
    np.testing.assert_allclose(dense(build_supports(A, "scalap"))[0], lap - np.eye(3), atol=1e-6)
    np.testing.assert_array_equal(dense(build_supports(A, "identity"))[0], np.eye(3))


def test_supports_are_sparse_and_handle_isolated_nodes():
    adj = np.zeros((4, 4))
    adj[0, 1] = 1
    (fwd,) = build_supports(adj, "transition")
    assert fwd.nnz == 1 and np.isfinite(fwd.toarray()).all()
    with pytest.raises(GWNetError, match="unknown adjtype"):
        build_supports(adj, "nope")


# --- windows, splits, scaler -------------------------------------------------------------
def _dcrnn_windows(series, seq_len, horizon, first_offset=1):
    """DCRNN generate_graph_seq2seq_io_data, as a loop."""
    x_off, y_off = np.arange(-(seq_len - 1), 1), np.arange(first_offset, first_offset + horizon)
    xs, ys = [], []
    for t in range(abs(x_off.min()), len(series) - y_off.max()):
        xs.append(series[t + x_off])
        ys.append(series[t + y_off])
    return np.stack(xs), np.stack(ys)


@pytest.mark.parametrize("seq_len,horizon,first_offset", [(12, 12, 1), (6, 3, 2), (4, 1, 1)])
def test_windows_match_dcrnn(seq_len, horizon, first_offset):
    df = make_speeds(300, 4)
    cfg = DataConfig(seq_len=seq_len, horizon=horizon, first_offset=first_offset, fill_zeroes=False)
    series = build_series(df, cfg)
    windows, scaler = make_splits(series, df.index, cfg)
    x_all, y_all = _dcrnn_windows(series.to_numpy(), seq_len, horizon, first_offset)
    n = len(x_all)
    n_test, n_train = round(0.2 * n), round(0.7 * n)
    assert [len(windows[s]) for s in ("train", "val", "test")] == [n_train, n - n_test - n_train, n_test]
    assert split_sizes(n) == {"train": n_train, "val": n - n_test - n_train, "test": n_test}
    x_train = x_all[:n_train]
    assert scaler.mean == pytest.approx(x_train[..., 0].mean(), rel=1e-6)
    assert scaler.std == pytest.approx(x_train[..., 0].std(), rel=1e-6)
    bounds = {"train": (0, n_train), "val": (n_train, n - n_test), "test": (n - n_test, n)}
    for split, (lo, hi) in bounds.items():
        x, y = windows[split].batch(torch.arange(hi - lo))
        expected = x_all[lo:hi].copy()
        expected[..., 0] = (expected[..., 0] - scaler.mean) / scaler.std
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), y_all[lo:hi, ..., 0])
    # origins: the timestamp of each window's last input step
    assert windows["val"].origins[0] == df.index[n_train + seq_len - 1]


def test_time_of_day_feature_and_day_of_week():
    df = make_speeds(300, 2)
    series = build_series(df, DataConfig(day_of_week=True)).to_numpy()
    tod = (df.index.hour * 60 + df.index.minute) / 1440
    np.testing.assert_allclose(series[:, 0, 1], tod, rtol=1e-6)
    assert series.shape[-1] == 9 and (series[:, 0, 2:].sum(1) == 1).all()
    assert series[0, 0, 2 + df.index[0].day_of_week] == 1


def test_fill_zeroes_inputs_only():
    df = make_speeds(300, 3)
    df.iloc[20:40, 0] = 0.0
    cfg = DataConfig(fill_zeroes=True)
    windows, scaler = make_splits(build_series(df, cfg), df.index, cfg)
    x, y = windows["train"].batch(torch.arange(40))
    filled = x[..., 0][torch.tensor(df.to_numpy())[torch.arange(40)[:, None] + torch.arange(12)] == 0]
    assert filled.numel() > 0 and torch.allclose(filled, torch.zeros(1))  # the mean scales to 0
    assert (y == 0).any()  # targets keep the zeros so the metrics can skip them


def test_windows_never_materialise():
    df = make_speeds(2000, 10)
    cfg = DataConfig()
    series = build_series(df, cfg)
    windows, _ = make_splits(series, df.index, cfg)
    assert windows["train"].series is windows["test"].series is series
    # the calendar is stored once per step, not once per sensor
    assert series.nbytes == df.size * 4 + len(df) * 4


def test_too_few_rows():
    df = make_speeds(23, 2)
    with pytest.raises(GWNetError, match="too few for one window of 24 steps"):
        make_splits(build_series(df, DataConfig()), df.index, DataConfig(), "tiny.h5")
    df = make_speeds(26, 2)
    with pytest.raises(GWNetError, match="too few for a non-empty"):
        make_splits(build_series(df, DataConfig()), df.index, DataConfig(), "tiny.h5")


def test_load_data_directory_and_files(tiny_dataset):
    cfg = DataConfig(dataset=str(tiny_dataset))
    data = load_data(cfg)
    assert data.num_nodes == 5 and data.sensor_ids == [f"s{i}" for i in range(5)]
    assert len(data.supports()) == 2
    x, origin = data.latest()
    assert x.shape == (1, 12, 5, 2) and origin == data.speeds.index[-1]
    same = load_data(DataConfig(data=str(tiny_dataset / "speeds.h5"), adj=str(tiny_dataset / "adj_mx.pkl")))
    assert same.scaler == data.scaler
    with pytest.raises(GWNetError, match="no sensor graph given"):
        load_data(DataConfig(data=str(tiny_dataset / "speeds.h5")))


def test_named_dataset_absent_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("GWNET_DATA", str(tmp_path))
    with pytest.raises(GWNetError, match="metr-la is not downloaded; see data/README.md"):
        load_data(DataConfig(dataset="metr-la"))


def test_export_npz_matches_dcrnn(tiny_dataset, tmp_path):
    from gwnet.cli.data import export_npz

    out = tmp_path / "npz"
    export_npz(str(tiny_dataset / "speeds.h5"), str(out))
    df = pd.read_hdf(tiny_dataset / "speeds.h5", "df")
    tod = ((df.index - df.index.normalize()) / pd.Timedelta(days=1)).to_numpy()
    series = np.stack([df.to_numpy(), np.tile(tod[:, None], (1, df.shape[1]))], axis=-1)
    x_all, y_all = _dcrnn_windows(series, 12, 12)
    n = len(x_all)
    n_test, n_train = round(0.2 * n), round(0.7 * n)
    train = np.load(out / "train.npz")
    test = np.load(out / "test.npz")
    assert train["x"].dtype == np.float64
    np.testing.assert_array_equal(train["x"], x_all[:n_train])
    np.testing.assert_array_equal(test["y"], y_all[-n_test:])
    np.testing.assert_array_equal(train["x_offsets"][:, 0], np.arange(-11, 1))
    np.testing.assert_array_equal(train["y_offsets"][:, 0], np.arange(1, 13))


def test_gaussian_kernel_threshold():
    d = np.array([[0, 1, np.inf], [2, 0, 3], [np.inf, np.inf, 0]], dtype=float)
    adj = gaussian_kernel_adjacency(d, 0.5)
    assert adj[0, 2] == 0 and adj[0, 0] == 1 and ((adj == 0) | (adj >= 0.5)).all()


# --- the command line --------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gwnet", "data", *args], capture_output=True, text=True)


def test_cli_inspect_and_errors(tiny_dataset, tmp_path):
    ok = _cli("inspect", str(tiny_dataset / "speeds.h5"), str(tiny_dataset / "adj_mx.pkl"))
    assert ok.returncode == 0, ok.stderr
    assert "sensors   5" in ok.stdout and "density" in ok.stdout
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    res = _cli("inspect", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and str(bad) in res.stderr and "Traceback" not in res.stderr


def test_a_registered_reader_is_read_and_checked_like_the_built_in_ones(tmp_path):
    from gwnet.data import register_reader
    from gwnet.registry import READERS

    @register_reader(".tsv")
    def read_tsv(path, key, dtype):
        return pd.read_csv(path, sep="\t", index_col=0, parse_dates=True)

    try:
        df = make_speeds(steps=20, nodes=3)
        df.iloc[3, 1] = np.nan
        df.to_csv(tmp_path / "speeds.tsv", sep="\t")
        with pytest.warns(UserWarning, match="1 NaN readings treated as missing"):
            got = read_speeds(tmp_path / "speeds.tsv")
        assert got.shape == (20, 3) and got.iloc[3, 1] == 0.0 and got.dtypes.iloc[0] == np.float32
    finally:
        READERS.remove(".tsv")
    with pytest.raises(GWNetError, match=r"speeds must be \.h5/\.hdf5/\.hdf/\.csv/\.parquet/\.pq/\.npz files \(no reader for \.tsv\)"):
        read_speeds(tmp_path / "speeds.tsv")
