"""Hostile and nonsensical input, second round: resource bombs, silent empties, options that make
no sense, crafted files. Every case is one line naming the problem (exit 2 at the CLI)."""
from __future__ import annotations

import math
import pickle
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_adj, make_speeds
from gwnet.cli.data import main as data_main
from gwnet.config import Config, DataConfig, GWNetConfig, coerce, read_config_file, update
from gwnet.data import TrafficData, load_data
from gwnet.data.graph import MAX_GRAPH_SENSORS, SensorGraph, align_graph, read_graph
from gwnet.engine.device import resolve_device
from gwnet.engine.metrics import MetricAccumulator
from gwnet.errors import GWNetError

IDS = ["a", "b"]


# --- a generator of broken inputs, as in test_reliability ------------------------------------
def _bytes_of(make):
    return lambda path: path.write_bytes(make())


def _shared_rows_pickle(n: int) -> bytes:
    """A DCRNN triple whose n x n adjacency is one row object repeated n times (a small file)."""
    row = [0.0] * n
    ids = [f"s{i}" for i in range(n)]
    return pickle.dumps([ids, {s: i for i, s in enumerate(ids)}, [row] * n], protocol=2)


def _nested_bomb() -> bytes:
    """Two sensor ids, an adjacency of 300 x 300 x 300 shared lists: 27M entries from a tiny file."""
    leaf = [0.0] * 300
    mid = [leaf] * 300
    return pickle.dumps([IDS, {"a": 0, "b": 1}, [mid] * 300], protocol=2)


def _deep_pickle() -> bytes:
    """An adjacency of lists nested 100,000 deep, written opcode by opcode (pickle.dumps itself
    would recurse too deeply)."""
    depth = 100_000
    body = b"]" * depth + b"a" * (depth - 1)  # EMPTY_LIST each, then APPEND each into its parent
    ids = pickle.dumps(IDS, protocol=2)[2:-1]
    index = pickle.dumps({"a": 0, "b": 1}, protocol=2)[2:-1]
    return b"\x80\x02(" + ids + index + body + b"l."  # MARK, ids, dict, adjacency, LIST, STOP


def _text(data: str):
    return lambda path: path.write_text(data)


def _h5(df, **kw):
    return lambda path: df.to_hdf(path, key="df", **kw)


def _edit_h5(edit):
    """A pandas fixed-format file with one dataset or attribute changed by ``edit(group)``."""
    def write(path):
        make_speeds(20, 3).to_hdf(path, key="df")
        with h5py.File(path, "a") as h5:
            edit(h5["df"])
    return write


def _replace(name, data, **attrs):
    def edit(group):
        old = dict(group[name].attrs)
        del group[name]
        group[name] = data
        for k, v in {**old, **attrs}.items():
            group[name].attrs[k] = v
    return edit


def _typo_year(path):
    df = make_speeds(40, 3)
    index = df.index.to_list()
    index[20:] = [t + pd.DateOffset(years=9) for t in index[20:]]  # 2012 -> 2021
    df.index = pd.DatetimeIndex(index)
    df.to_hdf(path, key="df")


BROKEN = [
    # 1. resource bombs
    ("shared.pkl", _bytes_of(lambda: _shared_rows_pickle(MAX_GRAPH_SENSORS + 1)), "more than the 20,000"),
    ("nested.pkl", _bytes_of(_nested_bomb), "more entries than 2 x 2"),
    ("typo.h5", _typo_year, "would grow the table from 40 to"),
    ("deep.pkl", _bytes_of(_deep_pickle), "nested too deeply"),
    ("idbomb.pkl", _bytes_of(lambda: pickle.dumps([[[[0.0] * 100] * 100] * 2, {}, np.eye(2)], protocol=2)),
     "sensor ids must be strings or integers"),
    # 2. graphs with no edge between two sensors
    ("equal.csv", _text("a,b,5\nb,a,5\n"), "all 2 distances are equal"),
    ("eye.pkl", lambda p: p.write_bytes(pickle.dumps([["s0", "s1", "s2"], {"s0": 0, "s1": 1, "s2": 2},
                                                      np.eye(3)], protocol=2)), "no edge between any two"),
    ("eye.npy", lambda p: np.save(p, np.eye(2, dtype=np.float32)), "no edge between any two of the data's 2"),
    ("zeros.npz", lambda p: np.savez(p, adj=np.zeros((2, 2))), "no edge between any two"),
    # 4. readers
    ("bools.csv", _text("t,a,b\n2012-01-01 00:00,True,1\n2012-01-01 00:05,False,2\n"), "true/false"),
    ("dupitems.h5", _edit_h5(_replace("block0_items", np.array([b"s0", b"s0", b"s2"]))), "duplicate block items"),
    ("rows.h5", _edit_h5(_replace("axis1", np.arange(10, dtype=np.int64) * 300_000_000_000)),
     "but the frame has 10 timestamps"),
    ("flat.h5", _edit_h5(_replace("block0_values", np.ones(60, np.float32))), "block 0 values have shape (60,)"),
    ("unit.h5", _edit_h5(lambda g: g["axis1"].attrs.__setitem__("kind", b"datetime64[fortnight]")),
     "unknown datetime unit 'fortnight'"),
    ("strindex.h5", _edit_h5(_replace("axis1", np.array([b"monday"] * 20))), "not integer timestamps"),
]


@pytest.mark.parametrize("name,writer,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_hostile_input_is_one_clear_line(tmp_path, capsys, name, writer, message):
    path = tmp_path / name
    writer(path)
    capsys.readouterr()
    if path.suffix in (".pkl", ".csv", ".npy", ".npz") and name not in ("bools.csv",):
        # a graph: load it with data of its sensors, where a user's file enters
        ids = {"equal.csv": IDS, "eye.pkl": ["s0", "s1", "s2"]}.get(name, IDS)
        speeds = make_speeds(400, len(ids))
        speeds.columns = ids
        speeds.to_hdf(tmp_path / "s.h5", key="df")
        with pytest.raises(GWNetError) as info:
            load_data(DataConfig(data=str(tmp_path / "s.h5"), adj=str(path)))
        err = str(info.value)
    else:
        assert data_main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gwnet-data: error: "), err
    assert str(path) in err and message in err and "\n" not in err and "Traceback" not in err, err


def test_shared_rows_under_the_limit_still_load(tmp_path):
    path = tmp_path / "ok.pkl"
    ids = ["a", "b", "c"]
    row = [1.0, 0.5, 0.0]
    path.write_bytes(pickle.dumps([ids, {s: i for i, s in enumerate(ids)}, [row] * 3], protocol=2))
    np.testing.assert_array_equal(read_graph(path).adj, np.array([row] * 3, np.float32))


def test_array_graph_headers_are_bounded(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((2, 2), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"(2, 2)", b"(30000, 30000)", 1))  # the header only; no data
    with pytest.raises(GWNetError, match="big.npy: adjacency has 30,000 sensors"):
        read_graph(path, sensor_ids=["a", "b"])


def test_small_gaps_are_still_filled(tmp_path):
    path = tmp_path / "gap.h5"
    make_speeds(40, 2).drop(make_speeds(40, 2).index[10:20]).to_hdf(path, key="df")
    with pytest.warns(UserWarning, match="10 missing 5-minute steps filled"):
        assert data_main(["inspect", str(path)]) == 0


def test_edgeless_graph_refused_where_the_data_meets_it():
    with pytest.raises(GWNetError, match="g.pkl: the graph has no edge between any two of the data's 2 sensors"):
        align_graph(SensorGraph(["a", "b"], np.eye(2)), ["a", "b"], "g.pkl")
    # one sensor needs no edge; a graph with edges elsewhere aligns as before
    with pytest.warns(UserWarning, match="1 graph sensor"):
        assert align_graph(SensorGraph(["a", "b"], np.eye(2)), ["a"]).num_nodes == 1
    assert align_graph(SensorGraph(["a", "b"], np.ones((2, 2))), ["b", "a"]).sensor_ids == ["b", "a"]


# --- splits with nothing to score --------------------------------------------------------------
def _frames(speeds):
    ids = list(speeds.columns)
    return speeds, SensorGraph(ids, make_adj(len(ids)))


def test_all_zero_file_and_empty_validation_split_are_refused():
    speeds, graph = _frames(make_speeds(400, 3))
    zero = speeds * 0
    with pytest.raises(GWNetError, match="z.h5: the train split has no valid target reading"):
        TrafficData.from_frames(zero, graph, DataConfig(), source="z.h5")
    val = speeds.copy()
    val.iloc[int(0.7 * 400) - 10:] = 0.0  # the validation and test targets: all missing
    with pytest.raises(GWNetError, match=r"v.h5: the val split has no valid target reading \(all are 0"):
        TrafficData.from_frames(val, graph, DataConfig(), source="v.h5")
    TrafficData.from_frames(speeds, graph, DataConfig(), source="ok.h5")


def test_empty_mask_scores_nan_not_zero():
    acc = MetricAccumulator(3)
    acc.update(torch.ones(2, 3, 4), torch.zeros(2, 3, 4))
    assert all(math.isnan(v) for v in acc.overall().values())
    assert acc.per_horizon().isna().all().all()
    acc.update(torch.full((1, 3, 4), 2.0), torch.ones(1, 3, 4))
    assert acc.overall()["mae"] == 1.0


def test_null_value_nan_is_refused_since_readers_store_missing_as_zero(tmp_path):
    """NaN readings become 0.0 when read, so a NaN null_value would score missing zeros as readings."""
    from gwnet.data.readers import read_speeds

    df = make_speeds(30, 2)
    df.iloc[3, 0] = np.nan
    df.to_csv(tmp_path / "nan.csv")
    with pytest.warns(UserWarning, match="NaN readings treated as missing"):
        assert read_speeds(tmp_path / "nan.csv").iloc[3, 0] == 0.0
    cfg = Config()
    cfg.train.null_value = float("nan")
    with pytest.raises(GWNetError, match="null_value nan marks nothing"):
        cfg.validate()
    cfg.train.null_value = float("-inf")
    with pytest.raises(GWNetError, match="null_value must be a finite number"):
        cfg.validate()


# --- options that make no sense ------------------------------------------------------------------
BAD_OPTIONS = [
    ("train", "clip", 0.0, "clip must be above 0"),
    ("train", "clip", -1.0, "clip must be above 0"),
    ("train", "lr_decay", 0.0, "lr_decay must be in (0, 1]"),
    ("train", "lr_decay", 1.5, "lr_decay must be in (0, 1]"),
    ("train", "lr", 0.0, "lr must be above 0"),
    ("train", "lr", float("nan"), "lr must be a finite number"),
    ("train", "lr", float("inf"), "lr must be a finite number"),
    ("train", "weight_decay", -1e-4, "weight_decay must be at least 0"),
    ("train", "batches_per_epoch", 0, "batches_per_epoch must be at least 1"),
    ("train", "patience", 0, "patience must be at least 1"),
    ("train", "seed", -1, "seed must be between 0 and 2**63-1"),
    ("train", "seed", 2**63, "seed must be between 0 and 2**63-1"),
    ("train", "clamp_min", 80.0, "clamp_min 80 must be below clamp_max 70"),
    ("train", "null_value", float("nan"), "null_value nan marks nothing"),
    ("train", "device", "meta", "unknown device 'meta'"),
    ("train", "device", "mps", "unknown device 'mps'"),
    ("train", "device", "cuda:x", "unknown device 'cuda:x'"),
    ("model", "dilation_channels", 0, "dilation_channels must be at least 1"),
    ("model", "skip_channels", 0, "skip_channels must be at least 1"),
    ("model", "end_channels", -3, "end_channels must be at least 1"),
    ("model", "residual_channels", 0, "residual_channels must be at least 1"),
]


@pytest.mark.parametrize("section,name,value,message", BAD_OPTIONS,
                         ids=[f"{b[1]}={b[2]}" for b in BAD_OPTIONS])
def test_nonsense_options_are_refused(section, name, value, message):
    cfg = Config()
    cfg.train.clamp_max = 70.0
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(GWNetError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        cfg.validate()


def test_sensible_edge_values_are_kept():
    cfg = Config()
    cfg.train.clip, cfg.train.lr_decay, cfg.train.batches_per_epoch = None, 1.0, None
    cfg.train.clamp_max, cfg.train.seed, cfg.train.device = None, 2**63 - 1, "cuda:1"
    cfg.validate()


def test_mlp_channels_are_refused():
    cfg = Config.from_preset("mlp")
    cfg.model.hidden_channels = 0
    with pytest.raises(GWNetError, match="hidden_channels at least 1"):
        cfg.validate()


def test_train_cli_refuses_nonsense_in_one_line(tmp_path, capsys):
    from gwnet.cli.train import main as train_main

    for flags, message in ((["--clip", "0"], "clip must be above 0"), (["--lr-decay", "2"], "lr_decay"),
                           (["--device", "meta"], "unknown device 'meta'")):
        assert train_main([*flags, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("ext,text", [
    (".toml", "[train]\nepochs = inf\n"),
    (".toml", "[train]\nlr = [0.1, 0.2]\n"),
    (".toml", "[train]\nbatch_size = {a = 1}\n"),
    (".yaml", "train:\n  epochs: .inf\n"),
    (".yaml", "train:\n  device: [cpu]\n"),
    (".json", '{"train": {"clip": {"x": 1}}}'),
    (".json", '{"train": {"epochs": 1e400}}'),
    (".json", '{"model": {"blocks": [4]}}'),
])
def test_config_files_with_lists_tables_or_inf_where_a_scalar_belongs(tmp_path, ext, text):
    path = tmp_path / f"c{ext}"
    path.write_text(text)
    with pytest.raises(GWNetError, match=f"{path.name}: option \\w+ must be"):
        update(Config(), read_config_file(path), source=str(path))


def test_coerce_keeps_exact_integers():
    assert coerce(Config().train.__class__, "seed", 2**63 - 1, "c") == 2**63 - 1
    assert coerce(Config().train.__class__, "epochs", "12", "c") == 12
    assert coerce(Config().train.__class__, "epochs", 5.0, "c") == 5
    with pytest.raises(GWNetError, match="option epochs must be int"):
        coerce(Config().train.__class__, "epochs", float("nan"), "c")


@pytest.mark.parametrize("name", ["meta", "mps", "cuda:x", "xla", "cpu:0x", ""])
def test_only_cpu_and_cuda_devices(name):
    with pytest.raises(GWNetError, match="unknown device"):
        resolve_device(name)
    with pytest.raises(GWNetError, match="unsupported device 'meta'"):
        resolve_device(torch.device("meta"))
    assert resolve_device("cpu") == torch.device("cpu")


# --- readers ---------------------------------------------------------------------------------------
def test_timezone_aware_index_keeps_local_wall_clock(tmp_path):
    from gwnet.data.readers import check_speeds

    df = make_speeds(24, 2)
    df.index = df.index.tz_localize("America/Los_Angeles")
    out = check_speeds(df, "tz")
    assert out.index.tz is None and out.index[0] == pd.Timestamp("2012-03-01 00:00")  # not 08:00 UTC
    path = tmp_path / "tz.h5"
    df.to_hdf(path, key="df")
    from gwnet.data.readers import read_speeds

    assert read_speeds(path).index[0] == pd.Timestamp("2012-03-01 00:00")
    fall = make_speeds(30, 2)
    fall.index = pd.date_range("2012-11-04 07:30", periods=30, freq="5min", tz="UTC").tz_convert("US/Pacific")
    with pytest.raises(GWNetError, match="repeat the local time 2012-11-04 01:00"):
        check_speeds(fall, "fall")


# --- reference checkpoints ------------------------------------------------------------------------
def _reference_without_graph_conv(trained_residual: bool = True):
    """An improved-format state_dict trained without --do_graph_conv: the reference still saves
    graph_convs for every layer, at their initial weights, and uses residual_convs."""
    from gwnet.nn import GWNet

    cfg = GWNetConfig(num_nodes=5, residual_channels=4, dilation_channels=4, skip_channels=6, end_channels=8,
                      out_dim=3, blocks=2, layers=2, do_graph_conv=False, addaptadj=False, num_supports=0)
    torch.manual_seed(0)
    model = GWNet(cfg, []).eval()
    if trained_residual:
        with torch.no_grad():  # trained weights leave the initialisation bounds
            for p in model.parameters():
                p.mul_(3.0)
    conv = lambda w: w[:, :, None, None]  # noqa: E731
    sd = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] != "layers":
            sd[key] = conv(value) if value.dim() == 2 else value
        elif parts[2] == "temporal":
            half = value.shape[0] // 2
            for name, part in (("filter", value[:half]), ("gate", value[half:])):
                sd[f"{name}_convs.{parts[1]}.{parts[3]}"] = part[:, :, None] if part.dim() == 3 else part
        elif parts[2] == "norm":
            sd[f"bn.{parts[1]}.{parts[3]}"] = value
        else:
            name = {"skip": "skip_convs", "residual": "residual_convs"}[parts[2]]
            sd[f"{name}.{parts[1]}.{parts[3]}"] = conv(value) if value.dim() == 2 else value
    width = 4 * (2 * 2 + 1)  # (order x fixed supports + 1) x dilation channels, no adaptive one
    for i in range(4):
        init = torch.nn.Conv2d(width, 4, (1, 1))
        sd[f"graph_convs.{i}.final_conv.weight"] = init.weight.detach().clone()
        sd[f"graph_convs.{i}.final_conv.bias"] = init.bias.detach().clone()
    last = torch.nn.Conv2d(4, 4, (1, 1))
    sd["residual_convs.3.weight"], sd["residual_convs.3.bias"] = last.weight.detach(), last.bias.detach()
    return model, sd


def test_reference_trained_without_graph_conv_is_detected(tmp_path):
    from gwnet.nn import load_reference_checkpoint

    model, sd = _reference_without_graph_conv()
    path = tmp_path / "nogc.pth"
    torch.save(sd, path)
    loaded = load_reference_checkpoint(path, num_nodes=5)  # no graph needed: none is used
    assert loaded.config.do_graph_conv is False
    x = torch.randn(3, 12, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        g = torch.Generator().manual_seed(0)
        adj = (torch.rand(5, 5, generator=g) + torch.eye(5)).numpy()
        with_graph = load_reference_checkpoint(path, adj=adj)  # the graph, when given, is not needed either
        torch.testing.assert_close(with_graph(x), model(x))
        assert (with_graph.config.order, with_graph.config.do_graph_conv) == (2, False)


def test_reference_that_cannot_tell_needs_the_option(tmp_path):
    from gwnet.nn import load_reference_checkpoint

    model, sd = _reference_without_graph_conv(trained_residual=False)
    path = tmp_path / "fresh.pth"
    torch.save(sd, path)
    with pytest.raises(GWNetError, match="fresh.pth: cannot tell whether it was trained with --do_graph_conv"):
        load_reference_checkpoint(path)
    assert load_reference_checkpoint(path, do_graph_conv=False).config.do_graph_conv is False


@pytest.mark.parametrize("key,value,message", [
    ("filter_convs.0.weight", torch.ones(4), "filter_convs.0.weight is a 1-D tensor"),
    ("end_conv_2.weight", torch.ones(3), "end_conv_2.weight is a 1-D tensor"),
    ("skip_convs.1.bias", torch.ones(2, 3), "skip_convs.1.bias is a 2-D tensor"),
    ("nodevec1", torch.ones(5), "nodevec1 is a 1-D tensor"),
])
def test_reference_tensors_of_the_wrong_rank(tmp_path, key, value, message):
    from gwnet.nn import load_reference_checkpoint

    _, sd = _reference_without_graph_conv()
    sd[key] = value
    path = tmp_path / "rank.pth"
    torch.save(sd, path)
    with pytest.raises(GWNetError, match=f"rank.pth: {message}"):
        load_reference_checkpoint(path)


# --- trained runs and predictions -------------------------------------------------------------------
def _payload():
    cfg = Config().resolve(num_nodes=2)  # consistent apart from the one edit of each case
    return {"config": cfg.to_dict(), "model": {"w": torch.zeros(1)},
            "scaler": {"mean": 50.0, "std": 10.0, "fill_zeroes": cfg.data.fill_zeroes},
            "sensor_ids": ["a", "b"], "adjacency": torch.ones(2, 2), "epoch": 1, "val_mae": 1.0}


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.pop("config"), "checkpoint lacks config"),
    (lambda p: p.pop("adjacency"), "checkpoint lacks adjacency"),
    (lambda p: [p.pop(k) for k in ("model", "scaler", "sensor_ids")], "checkpoint lacks model, scaler, sensor_ids"),
    (lambda p: p.update(sensor_ids="ab"), "entry 'sensor_ids' is 'ab', not a list"),
    (lambda p: p.update(scaler=[50.0, 10.0]), "entry 'scaler' is a list, not a table"),
    (lambda p: p.update(adjacency=torch.ones(3)), r"'adjacency' has shape \(3,\)"),
    (lambda p: p.update(model={"w": 1}), "'model' is not a state_dict"),
    (lambda p: p.update(scaler={"mean": "x", "std": 1.0, "fill_zeroes": True}), "scaler 'mean' is 'x', not a number"),
    (lambda p: p.update(scaler={"average": 1.0}), "scaler 'mean' is missing"),
])
def test_best_checkpoint_with_missing_or_ill_typed_entries(tmp_path, edit, message):
    from gwnet.engine import RunDir, save_checkpoint
    from gwnet.engine.inference import load_trained

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    payload = _payload()
    edit(payload)
    save_checkpoint(run.best, payload)
    with pytest.raises(GWNetError, match=f"best.pt: .*{message}") as info:
        load_trained(run.root)
    assert "\n" not in str(info.value)


def test_plotted_sensors_are_deduplicated_and_capped():
    from gwnet.ensemble.report import MAX_PLOTTED_SENSORS, sensor_positions

    speeds = make_speeds(400, 20)
    data = TrafficData.from_frames(speeds, SensorGraph(list(speeds.columns), make_adj(20)), DataConfig())
    with pytest.warns(UserWarning, match="more than once"):
        assert sensor_positions(data, ["s3"] * 300) == [3]
    with pytest.warns(UserWarning, match=f"only the first {MAX_PLOTTED_SENSORS} are plotted"):
        assert sensor_positions(data, [f"s{i}" for i in range(20)]) == list(range(MAX_PLOTTED_SENSORS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sensor_positions(data, ["s2", "s0"]) == [2, 0]
