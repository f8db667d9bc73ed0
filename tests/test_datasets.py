"""The field's other benchmarks and the user's own data: PEMS0X .npz, LargeST .h5 at 15
minutes, edge lists, array and PyG graphs, protocols as data, clamps that follow the data,
and the named datasets end to end (gwnet-train then gwnet-predict) on generated files in the
exact published layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import make_speeds
from gwnet.cli.data import main as data_main
from gwnet.cli.predict import main as predict_main
from gwnet.cli.train import main as train_main
from gwnet.config import Config, DataConfig
from gwnet.data import load_data, read_graph, read_speeds, synthetic
from gwnet.data.graph import graph_from_edge_index, graph_from_pyg
from gwnet.data.protocols import PEMS_FLOW
from gwnet.data.readers import ReadOptions, infer_step
from gwnet.engine import RunDir
from gwnet.engine.baselines import historical_average_table
from gwnet.errors import GWNetError

pytestmark = pytest.mark.filterwarnings("ignore:.*no timestamps in the file")


# --- readers ------------------------------------------------------------------------------
def pems_npz(path: Path, steps: int = 40, nodes: int = 4, features: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.uniform(1, 500, (steps, nodes, features)).astype(np.float32)
    np.savez(path, data=array)
    return array


def test_pems_npz_picks_the_target_feature_and_numbers_the_sensors(tmp_path):
    array = pems_npz(tmp_path / "PEMS08.npz")
    flow = read_speeds(tmp_path / "PEMS08.npz", options=ReadOptions(target="flow", start="2016-07-01"))
    speed = read_speeds(tmp_path / "PEMS08.npz", options=ReadOptions(target="speed", start="2016-07-01"))
    np.testing.assert_array_equal(flow.to_numpy(), array[:, :, 0])
    np.testing.assert_array_equal(speed.to_numpy(), array[:, :, 2])
    assert list(flow.columns) == ["0", "1", "2", "3"]
    assert flow.index[0] == pd.Timestamp("2016-07-01") and flow.index[1] - flow.index[0] == pd.Timedelta("5min")
    with pytest.raises(GWNetError, match=r"has 3 features; choose the target with --target \(flow, occupancy, speed\)"):
        read_speeds(tmp_path / "PEMS08.npz", options=ReadOptions(target="density"))


def test_pems03_ids_file_and_one_feature(tmp_path):
    array = pems_npz(tmp_path / "PEMS03.npz", features=1)
    (tmp_path / "PEMS03.txt").write_text("317842\n318120\n315106\n313344\n")
    got = read_speeds(tmp_path / "PEMS03.npz", options=ReadOptions(ids=str(tmp_path / "PEMS03.txt"),
                                                                    start="2018-09-01"))
    assert list(got.columns) == ["317842", "318120", "315106", "313344"]
    np.testing.assert_array_equal(got.to_numpy(), array[:, :, 0])
    (tmp_path / "PEMS03.txt").write_text("1\n2\n")
    with pytest.raises(GWNetError, match="lists 2 sensor ids, .* has 4 sensors"):
        read_speeds(tmp_path / "PEMS03.npz", options=ReadOptions(ids=str(tmp_path / "PEMS03.txt")))


def _stated_only(path: Path, shape: tuple, member: str = "data.npy") -> None:
    """An npz whose member is a bare header stating ``shape``: a few bytes that would ask for TBs."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, header.getvalue())


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, data=np.zeros((3, 4, 5, 6), np.float32)), r"has shape \(3, 4, 5, 6\)"),
    (lambda p: np.savez(p, a=np.zeros((3, 4)), b=np.zeros((3, 4))), "holds a, b; choose the readings with --key"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), "not a readable .npz"),
    (lambda p: np.savez(p, data=np.array([["a"]])), "is not numeric"),
    (lambda p: _stated_only(p, (10**7, 10**4, 3)), r"states shape \(10000000, 10000, 3\) .* more than the 16 GiB"),
    # without ".npy" numpy would still read the member, its header never bounded
    (lambda p: _stated_only(p, (10**7, 10**4, 3), member="data"), "'data' is not stored as data.npy"),
])
def test_bad_npz_is_one_line(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(GWNetError, match=message):
        read_speeds(path)


def test_largest_h5_at_15_minutes_and_its_time_of_day(tmp_path):
    paths = synthetic.write(tmp_path, nodes=6, days=2, layout="largest", name="sd")
    frame = read_speeds(paths["speeds"])
    assert frame.index[1] - frame.index[0] == pd.Timedelta("15min") and len(frame) == 2 * 96
    data = load_data(DataConfig(dataset=str(tmp_path), target="flow"))
    assert data.config.step_minutes == 15 and data.step == pd.Timedelta("15min")
    tod = data.series.calendar[:, 0].numpy()
    np.testing.assert_allclose(tod[:4], np.arange(4) * 15 / 1440, atol=1e-7)
    assert historical_average_table(data).shape == (96, 6)


@pytest.mark.parametrize("minutes", [1, 15, 60])
def test_any_regular_step_is_read_from_the_index(tmp_path, minutes):
    df = make_speeds(steps=50, nodes=3)
    df.index = pd.date_range("2020-01-01", periods=50, freq=f"{minutes}min")
    df.to_csv(tmp_path / "x.csv")
    assert infer_step(read_speeds(tmp_path / "x.csv").index) == pd.Timedelta(minutes=minutes)
    gap = df.drop(df.index[10:12])
    gap.to_csv(tmp_path / "gap.csv")
    with pytest.warns(UserWarning, match=f"2 missing {minutes}-minute steps filled"):
        assert len(read_speeds(tmp_path / "gap.csv")) == 50


# --- graphs -------------------------------------------------------------------------------
def test_edge_lists_pems_cost_headerless_and_weighted(tmp_path):
    ids = ["0", "1", "2"]
    (tmp_path / "PEMS.csv").write_text("from,to,cost\n0,1,520.5\n1,2,300\n")
    g = read_graph(tmp_path / "PEMS.csv", sensor_ids=ids)
    np.testing.assert_array_equal(g.adj, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])  # binary, both ways
    (tmp_path / "pairs.csv").write_text("0,1\n2,0\n")
    np.testing.assert_array_equal(read_graph(tmp_path / "pairs.csv", sensor_ids=ids).adj,
                                  [[0, 1, 1], [1, 0, 0], [1, 0, 0]])
    (tmp_path / "w.csv").write_text("from,to,weight\n0,1,0.5\n2,1,2\n")
    np.testing.assert_array_equal(read_graph(tmp_path / "w.csv", sensor_ids=ids).adj,
                                  [[0, 0.5, 0], [0, 0, 0], [0, 2, 0]])  # as listed, directed
    # a cost file read as distances (DCRNN's kernel, directed) when asked
    (tmp_path / "dist.csv").write_text("from,to,cost\n0,0,0\n0,1,100\n1,1,0\n1,2,300\n2,2,0\n")
    kernel = read_graph(tmp_path / "dist.csv", sensor_ids=ids, weights="kernel").adj
    assert kernel[0, 1] > 0.1 and kernel[1, 0] == 0 and kernel[1, 2] == 0  # 300 m is far for this std


def test_array_graphs_follow_the_column_order(tmp_path):
    adj = np.array([[0, 1, 0], [0.5, 0, 2], [0, 0, 0]], np.float32)
    np.save(tmp_path / "rn_adj.npy", adj)
    g = read_graph(tmp_path / "rn_adj.npy", sensor_ids=["a", "b", "c"])
    assert g.sensor_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(g.adj, adj)
    sp.save_npz(tmp_path / "adj.npz", sp.csr_matrix(adj))
    np.testing.assert_array_equal(read_graph(tmp_path / "adj.npz", sensor_ids=["a", "b", "c"]).adj, adj)
    with pytest.raises(GWNetError, match="adjacency is 3 x 3, the data has 2 sensors"):
        read_graph(tmp_path / "rn_adj.npy", sensor_ids=["a", "b"])
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    with pytest.raises(GWNetError, match=r"must be square \(N, N\), got shape \(3, 4\)"):
        read_graph(tmp_path / "flat.npy", sensor_ids=["a", "b", "c"])


def test_pyg_edge_index_and_data(tmp_path):
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    g = graph_from_edge_index(edge_index, torch.tensor([0.5, 1.0, 2.0]), sensor_ids=["a", "b", "c"])
    np.testing.assert_array_equal(g.adj, [[0, 0.5, 0], [0, 0, 1], [2, 0, 0]])
    with pytest.raises(GWNetError, match="refers to node 2, but the graph has 2 nodes"):
        graph_from_edge_index(edge_index, sensor_ids=["a", "b"])

    class Data:  # what torch_geometric.data.Data offers (duck-typed: no import of PyG)
        def __init__(self, **kw):
            self.__dict__.update(kw)

    pyg = Data(edge_index=edge_index, edge_attr=torch.tensor([[0.5], [1.0], [2.0]]), num_nodes=3)
    np.testing.assert_array_equal(graph_from_pyg(pyg).adj, g.adj)
    # and a model trains on it through the Python API
    speeds = make_speeds(steps=300, nodes=3)
    speeds.columns = ["a", "b", "c"]
    from gwnet.data import TrafficData

    data = TrafficData.from_frames(speeds, graph_from_pyg(pyg, ["a", "b", "c"]), DataConfig())
    assert data.supports()[0].nnz > 0


def test_real_pyg_data_when_installed():
    geometric = pytest.importorskip("torch_geometric.data")
    data = geometric.Data(edge_index=torch.tensor([[0, 1], [1, 0]]), num_nodes=2)
    np.testing.assert_array_equal(graph_from_pyg(data).adj, [[0, 1], [1, 0]])


# --- protocols and named datasets --------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A data root in the published layouts: PEMS08/ (ASTGCN release) and largest/ (LargeST)."""
    root = tmp_path_factory.mktemp("published")
    synthetic.write(root / "PEMS08", nodes=6, days=4, seed=2, layout="pems", name="PEMS08")
    synthetic.write(root / "largest", nodes=6, days=8, seed=3, layout="largest", name="sd")
    return root


def test_protocol_split_equals_an_independent_computation(data_root, monkeypatch):
    monkeypatch.setenv("GWNET_DATA", str(data_root))
    data = load_data(DataConfig(dataset="pems08"))
    steps = np.load(data_root / "PEMS08" / "PEMS08.npz")["data"].shape[0]
    n = steps - 12 - 12 + 1
    test, train = round(0.2 * n), round(0.6 * n)
    assert [len(data.windows[s]) for s in ("train", "val", "test")] == [train, n - train - test, test]
    c = data.config
    assert (c.train_ratio, c.test_ratio, c.target, c.unit, c.step_minutes) == (0.6, 0.2, "flow", "vehicles/5 min", 5)
    assert c.protocol.startswith("60/20/20 chronological, flow (vehicles/5 min), masked where 0")
    assert data.speeds.index[0] == pd.Timestamp("2016-07-01")  # PEMS08's conventional start
    assert data.clamp_max > 70  # flow: the training maximum, not 70
    assert PEMS_FLOW.clamp_max is None


def train_quick(argv: list[str]) -> int:
    return train_main([*argv, "--no-progress", "--epochs", "1", "--batches-per-epoch", "3", "--batch-size", "16",
                       "--residual-channels", "8", "--dilation-channels", "8", "--skip-channels", "8",
                       "--end-channels", "8"])


def test_pems08_trains_and_predicts_flow_unclamped(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GWNET_DATA", str(data_root))
    run = tmp_path / "run"
    assert train_quick(["--dataset", "pems08", "--out", str(run), "--lr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "protocol: 60/20/20 chronological, flow (vehicles/5 min)" in out and "MAE and RMSE in vehicles/5 min" in out
    saved = Config.load(RunDir(run).config)
    assert saved.train.clamp_max > 70 and saved.data.target == "flow" and saved.data.step_minutes == 5
    assert predict_main([str(run), "--out", str(tmp_path / "pred"), "--no-plots"]) == 0
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv", parse_dates=["origin_time", "target_time"])
    assert table["prediction"].max() > 70  # flows are hundreds of vehicles, never clamped at 70
    lead = (table["target_time"] - table["origin_time"]).dt.total_seconds() / 60
    assert sorted(lead.unique()) == list(range(5, 65, 5))


def test_largest_sd_predicts_15_to_180_minutes_ahead(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GWNET_DATA", str(data_root))
    run = tmp_path / "run"
    assert train_quick(["--dataset", "largest-sd", "--out", str(run)]) == 0
    assert predict_main([str(run), "--out", str(tmp_path / "pred"), "--no-plots"]) == 0
    described = json.loads((tmp_path / "pred" / "ensemble.json").read_text())
    assert [h["lead_minutes"] for h in described["horizons"]] == list(range(15, 195, 15))
    assert "60/20/20 chronological, flow (vehicles/15 min)" in capsys.readouterr().out


def test_own_npz_with_a_distance_csv_trains(tmp_path):
    synthetic.write(tmp_path / "mine", nodes=5, days=3, seed=4, layout="pems", name="x")
    (tmp_path / "mine" / "x.csv").rename(tmp_path / "mine" / "distance.csv")
    run = tmp_path / "run"
    assert train_quick(["--data", str(tmp_path / "mine" / "x.npz"), "--adj", str(tmp_path / "mine" / "distance.csv"),
                        "--start", "2020-01-06", "--out", str(run)]) == 0
    saved = Config.load(RunDir(run).config)
    assert saved.data.target == "flow" and saved.data.train_ratio == 0.7  # your own data: DCRNN's split


def test_named_dataset_absent_names_where_it_is_published(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GWNET_DATA", str(tmp_path))
    assert train_main(["--dataset", "pems04", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pems04 is not downloaded" in err and "STSGCN" in err


def test_graph_edges_that_miss_the_data_ids(tmp_path, capsys):
    synthetic.write(tmp_path / "d", nodes=5, days=3, seed=4, layout="pems", name="x")
    data = str(tmp_path / "d" / "x.npz")
    (tmp_path / "edges.csv").write_text("from,to,cost\n0,1,10\n")  # sensors 2..4 in no edge
    with pytest.warns(UserWarning, match="3 of 5 sensors appear in no edge of the graph"):
        read_graph(tmp_path / "edges.csv", sensor_ids=["0", "1", "2", "3", "4"])
    (tmp_path / "floats.csv").write_text("from,to,cost\n0.0,1.0,10\n1.0,2.0,5\n")  # ids that match nothing
    code = train_quick(["--data", data, "--adj", str(tmp_path / "floats.csv"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "no edges among the 5 sensors" in err and "'0.0'" in err
    assert not (tmp_path / "r").exists() or not RunDir(tmp_path / "r").last.exists()


def test_synth_cli_writes_each_layout_and_refuses_to_overwrite(tmp_path, capsys):
    for layout, files in (("pems", {"PEMS04.npz", "PEMS04.csv"}),
                          ("largest", {"PEMS04_his_2019.h5", "PEMS04_rn_adj.npy", "PEMS04_meta.csv"})):
        out = tmp_path / layout
        assert data_main(["synth", "--out", str(out), "--format", layout, "--name", "PEMS04", "--nodes", "5",
                          "--days", "1"]) == 0
        assert {p.name for p in out.iterdir()} == files
        assert data_main(["synth", "--out", str(out), "--format", layout, "--name", "PEMS04", "--nodes", "5",
                          "--days", "1"]) == 2
        assert "pass --overwrite" in capsys.readouterr().err
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert data_main(["synth", "--out", str(out), "--format", layout, "--name", "PEMS04", "--nodes", "5",
                          "--days", "1", "--overwrite"]) == 0
        assert {p.name for p in out.iterdir()} == files and before != {p.name: p.stat().st_mtime_ns
                                                                        for p in out.iterdir()}
        # a folder holding anything else is never written into
        assert data_main(["synth", "--out", str(out), "--format", layout, "--name", "other", "--nodes", "5",
                          "--days", "1", "--overwrite"]) == 2
        assert "did not write" in capsys.readouterr().err
    meta = pd.read_csv(tmp_path / "largest" / "PEMS04_meta.csv")
    assert list(meta.columns) == ["ID", "Lat", "Lng", "District", "County", "Fwy", "Lane", "Type", "Direction"]


def test_synthetic_flow_has_a_daily_profile():
    data = synthetic.generate(20, 7, seed=0)
    flow = data.flow.where(data.flow > 0)
    by_hour = flow.groupby(flow.index.hour).mean().mean(axis=1)
    assert by_hour[3] < 0.3 * by_hour[8] and by_hour[17] > 2 * by_hour[3]  # night vs rush hours
    assert 100 < float(flow.mean().mean()) < 600  # vehicles per 5 minutes, PEMS-like
    # congestion lowers speed and raises occupancy at the same time
    occ, speed = data.occupancy.to_numpy().ravel(), data.speeds.to_numpy().ravel()
    ok = speed > 0
    assert np.corrcoef(occ[ok], speed[ok])[0, 1] < -0.3
    np.testing.assert_array_equal(data.flow.to_numpy() == 0, data.speeds.to_numpy() == 0)


def test_largest_layout_is_streamed_into_a_frame_pandas_reads(tmp_path):
    paths = synthetic.write(tmp_path, nodes=7, days=9, seed=5, layout="largest", name="gla")  # two chunks
    theirs = pd.read_hdf(paths["speeds"], "t")
    ours = read_speeds(paths["speeds"])
    assert theirs.shape == (9 * 96, 7) and list(map(str, theirs.columns)) == list(ours.columns)
    np.testing.assert_array_equal(theirs.to_numpy(), ours.to_numpy())
    assert (theirs.index == ours.index).all() and theirs.index[1] - theirs.index[0] == pd.Timedelta("15min")
    # both weeks hold traffic with rush hours (the second chunk is not a copy of the first)
    first, second = ours.iloc[:7 * 96].to_numpy(), ours.iloc[7 * 96:].to_numpy()
    assert not np.array_equal(first[:len(second)], second) and second.mean() > 0
    adj = np.load(paths["adj"])
    assert adj.shape == (7, 7) and np.count_nonzero(adj - np.diag(np.diag(adj))) > 0
    again = synthetic.write(tmp_path / "again", nodes=7, days=9, seed=5, layout="largest", name="gla")
    np.testing.assert_array_equal(read_speeds(again["speeds"]).to_numpy(), ours.to_numpy())  # same seed


def test_fixed_frame_writer_refuses_a_short_or_oversized_frame(tmp_path):
    from gwnet.data.synthetic import FixedFrameWriter

    index = pd.date_range("2020-01-01", periods=4, freq="15min")
    with pytest.raises(ValueError, match="wrote 2 of 4 rows"):
        with FixedFrameWriter(tmp_path / "x.h5", "t", [1, 2], index) as frame:
            frame.write(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="do not fit the frame"):
        with FixedFrameWriter(tmp_path / "y.h5", "t", [1, 2], index) as frame:
            frame.write(np.ones((5, 2), np.float32))
