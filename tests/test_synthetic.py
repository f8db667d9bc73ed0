"""The synthetic METR-LA-format dataset: formats, determinism and traffic realism."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from gwnet.data import synthetic
from gwnet.data.graph import read_adjacency_pickle, read_distances_csv
from gwnet.data.synthetic import generate, write
from gwnet.errors import GWNetError


@pytest.fixture(scope="module")
def data():
    return generate()


@pytest.fixture(scope="module")
def valid(data):
    """Speeds with missing readings as NaN."""
    x = data.speeds.to_numpy()
    return np.where(x > 0, x, np.nan)


def hourly_means(data, valid, weekend: bool) -> pd.Series:
    """Network-mean speed per hour of day over weekdays or weekends."""
    index = data.speeds.index
    rows = (index.day_of_week >= 5) == weekend
    return pd.DataFrame(valid[rows]).groupby(index.hour[rows]).mean().mean(axis=1)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    a, b, c = generate(12, 2, seed=5), generate(12, 2, seed=5), generate(12, 2, seed=6)
    assert a.speeds.to_numpy().tobytes() == b.speeds.to_numpy().tobytes()
    assert a.graph.adj.tobytes() == b.graph.adj.tobytes()
    pd.testing.assert_frame_equal(a.speeds, b.speeds)
    pd.testing.assert_frame_equal(a.distances, b.distances)
    pd.testing.assert_frame_equal(a.locations, b.locations)
    assert a.speeds.to_numpy().tobytes() != c.speeds.to_numpy().tobytes()
    assert a.graph.sensor_ids != c.graph.sensor_ids


def test_frame_shape_dtype_index_and_ids(data):
    speeds = data.speeds
    assert speeds.shape == (14 * 288, 40)
    assert set(speeds.dtypes) == {np.dtype(np.float32)}
    assert speeds.index[0] == pd.Timestamp("2012-03-01")
    assert (np.diff(speeds.index.asi8) == 5 * 60 * 10**9).all()
    assert speeds.index.freq == pd.tseries.frequencies.to_offset("5min")
    ids = list(speeds.columns)
    assert len(set(ids)) == 40
    assert all(isinstance(s, str) and len(s) == 6 and s.isdigit() for s in ids)
    assert data.graph.sensor_ids == ids
    assert data.locations["sensor_id"].tolist() == ids
    assert set(data.distances["from"]) | set(data.distances["to"]) <= set(ids)


def test_start_date_sets_the_index():
    speeds = generate(3, 1, start="2017-01-01 06:00").speeds
    assert speeds.index[0] == pd.Timestamp("2017-01-01 06:00")
    assert len(speeds) == 288


def test_values_clipped_with_some_missing(data, valid):
    x = data.speeds.to_numpy()
    assert x.min() == 0.0 and x.max() == 70.0  # 70 mph is METR-LA's clip
    assert np.nanmin(valid) > 0
    missing = (x == 0).mean()
    assert 0.005 < missing < 0.10
    assert 55 < np.nanmean(valid) < 65


def test_missing_readings_include_single_dropouts_and_outages_of_hours(data):
    lost = data.speeds.to_numpy() == 0
    padded = np.pad(lost, ((1, 1), (0, 0))).astype(np.int8)
    edges = np.diff(padded, axis=0)
    starts, ends = np.nonzero(edges.T == 1), np.nonzero(edges.T == -1)
    runs = ends[1] - starts[1]
    assert (runs == 1).sum() >= 10
    assert (runs >= 24).sum() >= 3  # two hours or more


def test_rush_hours_slow_traffic_on_weekdays(data, valid):
    weekday = hourly_means(data, valid, weekend=False)
    assert weekday[8] < weekday[3] - 8
    assert weekday[17] < weekday[3] - 8
    assert weekday[12] > weekday[8] + 4  # the morning rush ends


def test_weekend_rush_is_weaker(data, valid):
    weekday = hourly_means(data, valid, weekend=False)
    weekend = hourly_means(data, valid, weekend=True)
    weekday_drop = weekday[3] - weekday[6:21].min()
    weekend_drop = weekend[3] - weekend[6:21].min()
    assert weekend_drop < 0.6 * weekday_drop
    assert weekend[8] > weekday[8] + 3


def test_incidents_congest_roads_outside_rush_hours(monkeypatch):
    # Midday demand stays below nearly every bottleneck's capacity: jams then are incidents.
    def midday_jams() -> float:
        data = generate(40, 28, seed=1)
        index = data.speeds.index
        midday = (index.day_of_week < 5) & (index.hour >= 11) & (index.hour < 14)
        x = data.speeds.to_numpy()[midday]
        return float(((x > 0) & (x < 40)).mean())

    with_incidents = midday_jams()
    monkeypatch.setattr(synthetic, "INCIDENTS_PER_SENSOR_DAY", 0.0)
    assert with_incidents > 0.002
    assert with_incidents > 5 * midday_jams()


def test_congestion_spreads_upstream_with_a_delay(data, valid):
    # Row i links to column j when j lies downstream of i: a jam at j reaches i later, so
    # i's congestion correlates best with j's congestion some steps before.
    jammed = np.where(np.isnan(valid), np.nan, valid < 0.75 * np.nanmedian(valid, axis=0))
    adj = data.graph.adj.copy()
    np.fill_diagonal(adj, 0)
    up, down = np.nonzero(adj)
    lags = np.arange(-8, 9)
    curve = np.nanmean([[lagged_corr(jammed[:, i], jammed[:, j], lag) for lag in lags]
                        for i, j in zip(up, down)], axis=0)
    assert 2 <= lags[np.argmax(curve)] <= 8
    assert curve[lags == 4] > curve[lags == -4] + 0.05


def lagged_corr(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """Correlation of ``a[t]`` with ``b[t - lag]`` over the steps where both are known."""
    if lag > 0:
        a, b = a[lag:], b[:-lag]
    elif lag < 0:
        a, b = a[:lag], b[-lag:]
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale > 0 else np.nan


def test_graph_neighbours_are_more_alike_than_random_pairs(data, valid):
    changes = pd.DataFrame(np.diff(valid, axis=0)).corr().to_numpy()
    adj = data.graph.adj.copy()
    np.fill_diagonal(adj, 0)
    linked = changes[adj > 0].mean()
    unlinked = changes[(adj == 0) & (adj.T == 0) & ~np.eye(40, dtype=bool)].mean()
    assert linked > 1.5 * unlinked


def test_neighbours_history_improves_an_hour_ahead_forecast(data):
    # Ridge forecasts 12 steps ahead from each sensor's last hour, with and without the mean
    # last hour of its downstream neighbours; both must beat repeating the last value.
    x = data.speeds.to_numpy().astype(np.float64)
    filled = pd.DataFrame(np.where(x > 0, x, np.nan)).ffill().bfill().to_numpy()
    adj = data.graph.adj.astype(np.float64)
    np.fill_diagonal(adj, 0)
    downstream = filled @ (adj / np.maximum(adj.sum(axis=1, keepdims=True), 1e-9)).T
    minutes = (data.speeds.index.hour * 60 + data.speeds.index.minute).to_numpy()
    angle = 2 * np.pi * minutes / 1440
    calendar = np.stack([np.sin(angle), np.cos(angle), np.sin(2 * angle), np.cos(2 * angle),
                         np.ones_like(angle)], axis=1)
    t = np.arange(11, len(x) - 12)
    target = x[t + 12]
    split = int(0.7 * len(t))

    def test_mae(series: list[np.ndarray]) -> float:
        cols = [s[t - k] for s in series for k in range(12)]
        cols += [np.broadcast_to(c[t][:, None], target.shape) for c in calendar.T]
        features = np.stack(cols, axis=-1)
        train = target[:split] > 0
        a, y = features[:split][train], target[:split][train]
        w = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ y)
        test = target[split:] > 0
        return float(np.abs(features[split:] @ w - target[split:])[test].mean())

    test = target[split:] > 0
    last_value = np.abs(filled[t[split:]] - target[split:])[test].mean()
    local, graph = test_mae([filled]), test_mae([filled, downstream])
    assert graph < local - 0.1
    assert graph < 0.92 * last_value


def test_adjacency_is_a_sparse_directed_gaussian_kernel():
    data = generate(207, 1, seed=0)
    adj = data.graph.adj
    assert adj.dtype == np.float32 and adj.shape == (207, 207)
    assert 0.02 < data.graph.density < 0.07  # METR-LA: 0.04
    assert (np.diag(adj) == 1).all()
    nonzero = adj[adj > 0]
    assert nonzero.min() >= 0.1 and nonzero.max() <= 1
    assert not np.array_equal(adj, adj.T)
    linked = data.distances[data.distances["from"] != data.distances["to"]]["distance"]
    assert linked.min() > 0
    # Within-kernel neighbours lie between a few hundred meters and several kilometers.
    dist = pd.DataFrame(np.inf, index=data.graph.sensor_ids, columns=data.graph.sensor_ids)
    for a, b, d in data.distances.itertuples(index=False):
        dist.loc[a, b] = d
    near = dist.to_numpy()[(adj > 0) & ~np.eye(207, dtype=bool)]
    assert 200 < near.min() and near.max() < 10_000
    locations = data.locations
    assert locations["latitude"].between(33, 35).all()
    assert locations["longitude"].between(-119, -117).all()


def test_written_files_round_trip(tmp_path, data):
    paths = write(tmp_path / "synthetic")
    assert {p.name for p in paths.values()} == {"speeds.h5", "adj_mx.pkl", "distances.csv",
                                                "locations.csv"}
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == sorted(
        p.name for p in paths.values())  # no temporary files left behind
    pd.testing.assert_frame_equal(pd.read_hdf(paths["speeds"], "df"), data.speeds)
    with open(paths["adj"], "rb") as fh:
        ids, id_to_ind, adj = pickle.load(fh, encoding="latin1")
    assert ids == data.graph.sensor_ids
    assert id_to_ind == {s: i for i, s in enumerate(ids)}
    assert adj.dtype == np.float32 and np.array_equal(adj, data.graph.adj)
    assert np.array_equal(read_adjacency_pickle(paths["adj"]).adj, data.graph.adj)
    from_csv = read_distances_csv(paths["distances"], ids)
    np.testing.assert_allclose(from_csv.adj, data.graph.adj, atol=1e-6)
    distances = pd.read_csv(paths["distances"], dtype={"from": str, "to": str})
    pd.testing.assert_frame_equal(distances, data.distances)
    locations = pd.read_csv(paths["locations"], dtype={"sensor_id": str})
    assert list(locations.columns) == ["index", "sensor_id", "latitude", "longitude"]
    pd.testing.assert_frame_equal(locations.drop(columns="index"), data.locations)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "speeds.h5").write_bytes(b"old")

    def broken(frame, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_hdf", broken)
    with pytest.raises(RuntimeError):
        write(tmp_path, nodes=4, days=1)
    assert (tmp_path / "speeds.h5").read_bytes() == b"old"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_into_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    with pytest.raises(GWNetError, match="taken"):
        write(blocker, nodes=4, days=1)


@pytest.mark.parametrize("kwargs", [dict(nodes=1), dict(nodes=0), dict(days=0), dict(days=-3),
                                    dict(seed=-1), dict(nodes=2.5), dict(days="7"),
                                    dict(nodes=True), dict(nodes=synthetic.MAX_NODES + 1),
                                    dict(start="yesterday-ish")])
def test_bad_arguments_raise_one_line_errors(kwargs):
    with pytest.raises(GWNetError) as err:
        generate(**kwargs)
    assert "\n" not in str(err.value)


def test_write_checks_arguments_before_touching_the_disk(tmp_path):
    with pytest.raises(GWNetError, match="nodes"):
        write(tmp_path / "out", nodes=1)
    assert not (tmp_path / "out").exists()
